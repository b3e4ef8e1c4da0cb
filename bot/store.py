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
from dataclasses import astuple, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from bot.migrations import StoreError as StoreError  # re-exported: callers catch it from here
from bot.migrations import migrate
from bot.rows import AdminAction, BlockedUser, Generation, NewGeneration, Received, Status

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000  # how long a statement waits for another process's lock

# Column lists come from the dataclasses, never from input, so the SQL built from them stays fixed.
_COLUMNS = ", ".join(f.name for f in fields(Generation))
_NEW_COLUMNS = [f.name for f in fields(NewGeneration)]
_INSERT = (
    f"INSERT INTO generations ({', '.join(_NEW_COLUMNS)}, status, attempts, created_at) "
    f"VALUES ({', '.join('?' for _ in _NEW_COLUMNS)}, 'queued', 1, ?)"
)
_SELECT = f"SELECT {_COLUMNS} FROM generations"
_IS_UNFINISHED = "status IN ('queued', 'running')"  # finished rows are never changed back by a late update


class Store:
    """The generation log. Open with `await Store.open(path)`; every write commits before it returns."""

    def __init__(self, db: aiosqlite.Connection, path: Path, blocked: set[int]) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self._blocked = blocked  # kept in memory: checked before every acknowledgement, which cannot wait
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
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # later steps wait for other processes
            mode = await _switch_to_wal(db)
            if mode.lower() != "wal":
                log.warning("SQLite at %s runs in journal mode %r, not WAL", path, mode)
            await db.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; fsync only at checkpoints
            await db.execute("PRAGMA foreign_keys = ON")
            await migrate(db, path)
            blocked = {user_id for (user_id,) in await db.execute_fetchall("SELECT user_id FROM blocked_users")}
        except BaseException:
            await db.close()
            raise
        return cls(db, path, blocked)

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

    async def attach_image(self, id: int, image: bytes, *, width: int, height: int, prompt: str) -> bool:
        """Keep the init image of a request that passed its checks, with the size it is drawn at and the prompt
        (which may have come from the image)."""
        return await self._update(
            "UPDATE generations SET init_image = ?, width = ?, height = ?, prompt = ?"
            f" WHERE id = ? AND {_IS_UNFINISHED}",
            (image, width, height, prompt, id),
        )

    async def prune_init_images(self, *, max_age: float, max_bytes: int) -> int:
        """Drop the init images of finished rows older than `max_age` seconds, then the oldest ones until the rest
        hold at most `max_bytes`; 0 turns either rule off. Returns how many were dropped. Their rows stay."""
        pruned = 0
        finished = f"init_image IS NOT NULL AND NOT ({_IS_UNFINISHED})"
        async with self._lock:
            if max_age:
                cursor = await self._db.execute(
                    f"UPDATE generations SET init_image = NULL, image_pruned = 1 WHERE {finished} AND created_at < ?",
                    (time.time() - max_age,),
                )
                pruned += cursor.rowcount
            if max_bytes:
                rows = await self._db.execute_fetchall(
                    f"SELECT id, length(init_image) FROM generations WHERE {finished} ORDER BY id DESC"
                )
                total, drop = 0, []
                for id, size in rows:
                    total += size
                    if total > max_bytes:
                        drop.append((id,))
                await self._db.executemany(
                    "UPDATE generations SET init_image = NULL, image_pruned = 1 WHERE id = ?", drop
                )
                pruned += len(drop)
        return pruned

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
            self._blocked.add(user_id)  # after the commit: a block that failed to save is not in force either
        return cursor.rowcount > 0

    async def unblock(self, user_id: int) -> bool:
        """False if the user was not blocked."""
        lifted = await self._update("DELETE FROM blocked_users WHERE user_id = ?", (user_id,))
        self._blocked.discard(user_id)
        return lifted

    def is_blocked(self, user_id: int) -> bool:
        """From memory: the table is read at open and kept in step by `block` and `unblock`."""
        return user_id in self._blocked

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

    async def recover_unfinished(self, *, max_attempts: int) -> tuple[list[Generation], list[Generation]]:
        """At start-up after a crash: the rows left queued or running, as (to run again, to give up), oldest first.

        In one transaction, every such row goes back to queued, and those to run again count their next attempt
        now, before any work on them starts. A row that was started `max_attempts` times is to be given up (it may
        be what crashes the bot, at whatever stage): it stays queued until the caller has told its user and marks
        it failed, so that a crash in between tells them at the next start.
        """
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                given_up = {
                    id
                    for (id,) in await self._db.execute_fetchall(
                        f"SELECT id FROM generations WHERE {_IS_UNFINISHED} AND attempts >= ?", (max_attempts,)
                    )
                }
                await self._db.execute(
                    "UPDATE generations SET status = 'queued', attempts = attempts + (attempts < ?)"
                    f" WHERE {_IS_UNFINISHED}",
                    (max_attempts,),
                )
                rows = await self._select(f"{_SELECT} WHERE {_IS_UNFINISHED} ORDER BY id")
            except BaseException:
                await self._db.rollback()
                raise
            await self._db.commit()
        return [r for r in rows if r.id not in given_up], [r for r in rows if r.id in given_up]

    async def add_received(self, received: Received) -> None:
        """Note an acknowledged command, button press or reply until it finishes (`forget_received`); see
        `lost_received`."""
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
                " WHERE EXISTS (SELECT 1 FROM generations g WHERE g.source_id = received.interaction_id)"
            )
        rows = await self._db.execute_fetchall(
            "SELECT interaction_id, user_id, guild_id, channel_id, command, prompt, received_at FROM received"
            " ORDER BY interaction_id"
        )
        return [Received(*row) for row in rows]


def _fits_sqlite(number: int) -> bool:
    """SQLite integers are signed 64-bit."""
    return -(2**63) <= number < 2**63


def _generation(row: sqlite3.Row) -> Generation:
    values = dict(zip(row.keys(), row, strict=True))
    for name in ("seeds", "timings", "notices"):
        values[name] = json.loads(values[name])
    values["image_pruned"] = bool(values["image_pruned"])
    return Generation(**values)


async def _switch_to_wal(db: aiosqlite.Connection) -> str:
    """Put the database in WAL mode and return the journal mode it has.

    The switch needs the file to itself, and SQLite answers "database is locked" at once, without the busy
    timeout, while another process opens or migrates the same new file: so it is retried for as long.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            async with db.execute("PRAGMA journal_mode = WAL") as cursor:
                row = await cursor.fetchone()
            return str(row[0]) if row else "unknown"
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
