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
from dataclasses import dataclass, field, fields, replace
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
]


class StoreError(Exception):
    """The database cannot be used by this version of sdbot."""


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
