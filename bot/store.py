"""The generation log in SQLite: every request's prompt, settings, seeds and outcome.

Rerolls, reproductions and /history read it back, and after a crash the bot finds the jobs it never finished.
One aiosqlite connection is the only writer: aiosqlite runs it on one thread, and a lock keeps a multi-statement
transaction from interleaving with another coroutine's write.

    store = await Store.open("sdbot.sqlite3")   # or: async with await Store.open(path) as store:
    gen_id = await store.add(NewGeneration(...))
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from dataclasses import astuple, dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import aiosqlite

log = logging.getLogger(__name__)

Kind = Literal["imagine", "variation", "reroll"]
Status = Literal["queued", "running", "done", "failed", "cancelled"]
UNFINISHED: tuple[Status, ...] = ("queued", "running")

# Numbered schema migrations: MIGRATIONS[n - 1] brings the database to `PRAGMA user_version` n.
# Never edit a released one; append a new one.
MIGRATIONS: list[str] = [
    # 1: the generation log
    """
    CREATE TABLE generations (
        id             INTEGER PRIMARY KEY,
        kind           TEXT    NOT NULL CHECK (kind IN ('imagine', 'variation', 'reroll')),
        user_id        INTEGER NOT NULL,
        guild_id       INTEGER,            -- NULL in DMs
        channel_id     INTEGER NOT NULL,
        interaction_id INTEGER,            -- NULL when started from a message reply
        message_id     INTEGER,            -- the result message, once posted
        prompt         TEXT    NOT NULL,
        negative       TEXT    NOT NULL,
        scheduler      TEXT    NOT NULL,
        steps          INTEGER NOT NULL,
        guidance       REAL    NOT NULL,
        width          INTEGER,            -- NULL until resolved (the model's native size)
        height         INTEGER,
        count          INTEGER NOT NULL,
        strength       REAL,               -- variations only
        seed           INTEGER,            -- requested or first seed; NULL until resolved
        seeds          TEXT    NOT NULL DEFAULT '[]',   -- JSON list, one seed per image
        model          TEXT    NOT NULL,
        init_image     BLOB,               -- kept so that rerolls of a variation work
        parent_id      INTEGER REFERENCES generations (id),
        status         TEXT    NOT NULL DEFAULT 'queued'
                       CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        reason         TEXT,
        created_at     REAL    NOT NULL,   -- unix seconds
        started_at     REAL,
        finished_at    REAL,
        timings        TEXT    NOT NULL DEFAULT '{}',   -- JSON object: seconds per phase
        notices        TEXT    NOT NULL DEFAULT '[]'    -- JSON list of strings
    );
    CREATE INDEX generations_user ON generations (user_id, id);
    CREATE INDEX generations_status ON generations (status);
    """,
    # 2: users blocked by an admin, and the audit log of admin actions
    """
    CREATE TABLE blocked_users (
        user_id    INTEGER PRIMARY KEY,
        blocked_by INTEGER NOT NULL,
        reason     TEXT    NOT NULL DEFAULT '',
        created_at REAL    NOT NULL
    );
    CREATE TABLE admin_actions (
        id         INTEGER PRIMARY KEY,
        actor_id   INTEGER NOT NULL,      -- who did it
        action     TEXT    NOT NULL,      -- pause, resume, cancel, purge, block, unblock
        target     INTEGER,               -- the user or generation acted on
        detail     TEXT    NOT NULL DEFAULT '',
        guild_id   INTEGER,               -- where it was done; NULL in DMs
        created_at REAL    NOT NULL
    );
    """,
    # 3: crash recovery. `interruptions` counts the crashes a generation was running in, so that one that keeps
    # crashing the bot is given up. `received` holds the slash commands acknowledged but not yet finished, so that
    # one whose generation row was never written is still reported after a crash.
    """
    ALTER TABLE generations ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX generations_interaction ON generations (interaction_id);
    CREATE TABLE received (
        interaction_id INTEGER PRIMARY KEY,
        user_id        INTEGER NOT NULL,
        guild_id       INTEGER,            -- NULL in DMs
        channel_id     INTEGER NOT NULL,
        command        TEXT    NOT NULL,
        prompt         TEXT    NOT NULL DEFAULT '',
        received_at    REAL    NOT NULL
    );
    """,
]


class StoreError(Exception):
    """The database cannot be used by this version of sdbot."""


@dataclass(frozen=True)
class BlockedUser:
    user_id: int
    blocked_by: int
    reason: str
    created_at: float


@dataclass(frozen=True)
class AdminAction:
    id: int
    actor_id: int
    action: str
    target: int | None
    detail: str
    guild_id: int | None
    created_at: float


@dataclass(frozen=True, kw_only=True)
class NewGeneration:
    """What the bot knows about a request when it logs it as queued."""

    kind: Kind
    user_id: int
    channel_id: int
    prompt: str
    negative: str
    scheduler: str
    steps: int
    guidance: float
    model: str
    guild_id: int | None = None
    interaction_id: int | None = None
    width: int | None = None
    height: int | None = None
    count: int = 1
    strength: float | None = None
    seed: int | None = None
    init_image: bytes | None = field(default=None, repr=False)
    parent_id: int | None = None


@dataclass(frozen=True)
class Generation:
    """One row of the log."""

    id: int
    kind: Kind
    user_id: int
    guild_id: int | None
    channel_id: int
    interaction_id: int | None
    message_id: int | None
    prompt: str
    negative: str
    scheduler: str
    steps: int
    guidance: float
    width: int | None
    height: int | None
    count: int
    strength: float | None
    seed: int | None
    seeds: list[int]
    model: str
    init_image: bytes | None = field(repr=False)
    parent_id: int | None
    status: Status
    reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float]
    notices: list[str]

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED


# Column lists come from the dataclasses, never from input, so the SQL built from them stays fixed.
_COLUMNS = ", ".join(f.name for f in fields(Generation))
_NEW_COLUMNS = [f.name for f in fields(NewGeneration)]
_INSERT = (
    f"INSERT INTO generations ({', '.join(_NEW_COLUMNS)}, status, created_at) "
    f"VALUES ({', '.join('?' for _ in _NEW_COLUMNS)}, 'queued', ?)"
)
_SELECT = f"SELECT {_COLUMNS} FROM generations"
_IS_UNFINISHED = "status IN ('queued', 'running')"  # finished rows are never changed back by a late update


class Store:
    """The generation log. Open with `await Store.open(path)`; every write commits before it returns."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self.path = path

    @classmethod
    async def open(cls, path: str | Path) -> Self:
        """Open the database, creating the file and its folder on first start, and migrate it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; single statements autocommit, and transactions are
        # explicit BEGIN ... COMMIT.
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = aiosqlite.Row
            async with db.execute("PRAGMA journal_mode = WAL") as cursor:
                mode = await cursor.fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                log.warning("SQLite at %s runs in journal mode %r, not WAL", path, mode and mode[0])
            await db.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; fsync only at checkpoints
            await db.execute("PRAGMA busy_timeout = 5000")
            await db.execute("PRAGMA foreign_keys = ON")
            await _migrate(db, path)
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # Writes

    async def add(self, new: NewGeneration) -> int:
        """Log a request as queued and return its id."""
        values = [getattr(new, name) for name in _NEW_COLUMNS]
        async with self._lock:
            cursor = await self._db.execute(_INSERT, [*values, time.time()])
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def mark_running(self, id: int) -> bool:
        """Queued -> running. False if the row is not queued (e.g. cancelled meanwhile)."""
        return await self._update(
            "UPDATE generations SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
            (time.time(), id),
        )

    async def mark_done(
        self,
        id: int,
        *,
        seeds: list[int],
        width: int,
        height: int,
        timings: dict[str, float],
        notices: list[str],
        message_id: int | None = None,
    ) -> bool:
        """Record a success with the resolved seeds and size. False if the row was already finished."""
        return await self._update(
            "UPDATE generations SET status = 'done', finished_at = ?, seeds = ?, seed = COALESCE(seed, ?),"
            " width = ?, height = ?, timings = ?, notices = ?, message_id = COALESCE(?, message_id)"
            f" WHERE id = ? AND {_IS_UNFINISHED}",
            (
                time.time(),
                json.dumps(seeds),
                seeds[0] if seeds else None,
                width,
                height,
                json.dumps(timings),
                json.dumps(notices, ensure_ascii=False),
                message_id,
                id,
            ),
        )

    async def set_message(self, id: int, message_id: int) -> bool:
        """Remember the message that shows the result (posted after the row is done)."""
        return await self._update("UPDATE generations SET message_id = ? WHERE id = ?", (message_id, id))

    async def mark_failed(self, id: int, reason: str) -> bool:
        return await self._finish(id, "failed", reason)

    async def mark_cancelled(self, id: int, reason: str = "cancelled") -> bool:
        return await self._finish(id, "cancelled", reason)

    async def fail_unfinished(self, reason: str) -> list[Generation]:
        """Mark every queued or running row failed, in one transaction, and return them (now failed).

        Meant for start-up after a crash, so their users can be told.
        """
        now = time.time()
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = await self._select(f"{_SELECT} WHERE {_IS_UNFINISHED} ORDER BY id")
                await self._db.execute(
                    f"UPDATE generations SET status = 'failed', reason = ?, finished_at = ? WHERE {_IS_UNFINISHED}",
                    (reason, now),
                )
            except BaseException:
                await self._db.rollback()
                raise
            await self._db.commit()
        # The lock kept other writes out, so the UPDATE changed exactly the rows read above.
        return [replace(row, status="failed", reason=reason, finished_at=now) for row in rows]

    # Reads

    async def get(self, id: int) -> Generation | None:
        if not _fits_sqlite(id):  # an id from a forged custom_id or option: no such row, rather than OverflowError
            return None
        rows = await self._select(f"{_SELECT} WHERE id = ?", (id,))
        return rows[0] if rows else None

    async def history(self, user_id: int, *, limit: int = 10, offset: int = 0) -> list[Generation]:
        """The user's generations, newest first."""
        if limit < 1 or offset < 0:
            raise ValueError(f"history needs limit >= 1 and offset >= 0, not limit={limit}, offset={offset}")
        return await self._select(
            f"{_SELECT} WHERE user_id = ? ORDER BY id DESC LIMIT ? OFFSET ?", (user_id, limit, offset)
        )

    async def count_for_user(self, user_id: int) -> int:
        async with self._db.execute("SELECT COUNT(*) FROM generations WHERE user_id = ?", (user_id,)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def unfinished(self) -> list[Generation]:
        """Queued or running rows, oldest first."""
        return await self._select(f"{_SELECT} WHERE {_IS_UNFINISHED} ORDER BY id")

    # Helpers

    async def _update(self, sql: str, params: tuple[Any, ...]) -> bool:
        async with self._lock:
            cursor = await self._db.execute(sql, params)
        return cursor.rowcount > 0

    async def _finish(self, id: int, status: Status, reason: str) -> bool:
        return await self._update(
            f"UPDATE generations SET status = ?, reason = ?, finished_at = ? WHERE id = ? AND {_IS_UNFINISHED}",
            (status, reason, time.time(), id),
        )

    async def _select(self, sql: str, params: tuple[Any, ...] = ()) -> list[Generation]:
        rows = await self._db.execute_fetchall(sql, params)
        return [_generation(row) for row in rows]

    # Blocked users and the admin audit log

    async def block(self, user_id: int, *, by: int, reason: str = "") -> bool:
        """Block a user; False if they already were (the first block, with its reason, stays)."""
        async with self._lock:
            cursor = await self._db.execute(
                "INSERT OR IGNORE INTO blocked_users (user_id, blocked_by, reason, created_at) VALUES (?, ?, ?, ?)",
                (user_id, by, reason, time.time()),
            )
        return cursor.rowcount > 0

    async def unblock(self, user_id: int) -> bool:
        """False if the user was not blocked."""
        return await self._update("DELETE FROM blocked_users WHERE user_id = ?", (user_id,))

    async def is_blocked(self, user_id: int) -> bool:
        async with self._db.execute("SELECT 1 FROM blocked_users WHERE user_id = ?", (user_id,)) as cursor:
            return await cursor.fetchone() is not None

    async def blocked_users(self) -> list[BlockedUser]:
        """Everyone blocked, longest blocked first."""
        rows = await self._db.execute_fetchall(
            "SELECT user_id, blocked_by, reason, created_at FROM blocked_users ORDER BY created_at, user_id"
        )
        return [BlockedUser(*row) for row in rows]

    async def log_admin_action(
        self, actor_id: int, action: str, *, target: int | None = None, detail: str = "", guild_id: int | None = None
    ) -> None:
        async with self._lock:
            await self._db.execute(
                "INSERT INTO admin_actions (actor_id, action, target, detail, guild_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (actor_id, action, target, detail, guild_id, time.time()),
            )

    async def admin_actions(self, *, limit: int = 100) -> list[AdminAction]:
        """The latest admin actions, newest first."""
        rows = await self._db.execute_fetchall(
            "SELECT id, actor_id, action, target, detail, guild_id, created_at FROM admin_actions"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [AdminAction(*row) for row in rows]

    # Crash recovery

    async def recover_unfinished(self, *, max_interruptions: int) -> tuple[list[Generation], list[Generation]]:
        """At start-up after a crash: the rows left queued or running, as (to run again, to give up), oldest first.

        In one transaction, each running row counts one more interruption and goes back to queued. A row interrupted
        `max_interruptions` times is to be given up (it may be what crashes the bot): it stays queued until the
        caller has told its user and marks it failed, so that a crash in between tells them at the next start.
        """
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.execute(
                    "UPDATE generations SET status = 'queued', interruptions = interruptions + 1"
                    " WHERE status = 'running'"
                )
                rows = await self._select(f"{_SELECT} WHERE {_IS_UNFINISHED} ORDER BY id")
                given_up = {
                    id
                    for (id,) in await self._db.execute_fetchall(
                        f"SELECT id FROM generations WHERE {_IS_UNFINISHED} AND interruptions >= ?",
                        (max_interruptions,),
                    )
                }
            except BaseException:
                await self._db.rollback()
                raise
            await self._db.commit()
        return [r for r in rows if r.id not in given_up], [r for r in rows if r.id in given_up]

    async def add_received(self, received: Received) -> None:
        """Note an acknowledged command until it finishes (`forget_received`); see `take_lost_received`."""
        async with self._lock:
            await self._db.execute(
                "INSERT OR IGNORE INTO received"
                " (interaction_id, user_id, guild_id, channel_id, command, prompt, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                astuple(received),
            )

    async def forget_received(self, interaction_id: int) -> None:
        await self._update("DELETE FROM received WHERE interaction_id = ?", (interaction_id,))

    async def lost_received(self) -> list[Received]:
        """At start-up: the commands of the last run that never got a generation row, oldest first. The others are
        dropped: they are recovered with their row. Each stays until `forget_received`, once its user is told."""
        async with self._lock:
            await self._db.execute(
                "DELETE FROM received"
                " WHERE EXISTS (SELECT 1 FROM generations g WHERE g.interaction_id = received.interaction_id)"
            )
        rows = await self._db.execute_fetchall(
            "SELECT interaction_id, user_id, guild_id, channel_id, command, prompt, received_at FROM received"
            " ORDER BY interaction_id"
        )
        return [Received(*row) for row in rows]


@dataclass(frozen=True)
class Received:
    """A slash command the bot acknowledged, noted before its generation row exists."""

    interaction_id: int
    user_id: int
    guild_id: int | None
    channel_id: int
    command: str
    prompt: str
    received_at: float


def _fits_sqlite(number: int) -> bool:
    """SQLite integers are signed 64-bit."""
    return -(2**63) <= number < 2**63


def _generation(row: sqlite3.Row) -> Generation:
    values = dict(zip(row.keys(), row, strict=True))
    for name in ("seeds", "timings", "notices"):
        values[name] = json.loads(values[name])
    return Generation(**values)


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Run the migrations the database has not seen yet, each in its own transaction."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database '{path}' has schema version {version}, newer than this sdbot knows ({len(MIGRATIONS)}):"
            " upgrade sdbot or use another [storage] database"
        )
    for number in range(version + 1, len(MIGRATIONS) + 1):
        log.info("Migrating %s to schema version %d", path, number)
        # user_version is part of the transaction, so a failed migration leaves the version unchanged.
        script = f"BEGIN IMMEDIATE;\n{MIGRATIONS[number - 1]}\nPRAGMA user_version = {number};\nCOMMIT;"
        try:
            await db.executescript(script)
        except BaseException:
            if db.in_transaction:
                await db.rollback()
            raise
