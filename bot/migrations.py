"""The database schema as numbered migrations, and the code that brings a database up to date."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import aiosqlite

log = logging.getLogger(__name__)


class StoreError(Exception):
    """The database cannot be used by this version of sdbot."""


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
    # 4: crash loops bounded at every stage. `attempts` counts the starts of work on a generation (its first run
    # included), so that one that takes the process down anywhere, even while queued, is given up; it replaces
    # `interruptions`, which only counted crashes while running. `source_id` is the interaction or the message
    # that asked for it, so that `received` notes of replies (which have no interaction) match their row too.
    # Init images can be pruned for retention: `image_pruned` says a row had one.
    """
    ALTER TABLE generations ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    UPDATE generations SET attempts = interruptions + 1 WHERE status IN ('queued', 'running');
    ALTER TABLE generations ADD COLUMN source_id INTEGER;
    UPDATE generations SET source_id = interaction_id;
    CREATE INDEX generations_source ON generations (source_id);
    ALTER TABLE generations ADD COLUMN image_pruned INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX generations_images ON generations (created_at) WHERE init_image IS NOT NULL;
    """,
    # 5: the hires fix. NULL `hires_scale`: none. An Upscale button's row is a `reroll` of one image with these set
    # (kind's CHECK cannot grow without rebuilding the table).
    """
    ALTER TABLE generations ADD COLUMN hires_scale REAL;
    ALTER TABLE generations ADD COLUMN hires_strength REAL;
    ALTER TABLE generations ADD COLUMN hires_steps INTEGER;     -- NULL: the first pass's steps
    ALTER TABLE generations ADD COLUMN hires_upscaler TEXT;
    """,
]


async def migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Run the migrations the database has not seen yet, in one transaction.

    The write lock comes first and the version is read under it: two processes starting on one new file (a bot
    and `sdbot --check`, say) migrate it once, the second one waiting for the first. A failed migration leaves
    the database as it was, version included.
    """
    await db.execute("BEGIN IMMEDIATE")
    try:
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
            for statement in _statements(MIGRATIONS[number - 1]):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {number}")
        await db.commit()
    except BaseException:
        if db.in_transaction:
            await db.rollback()
        raise


def _statements(script: str) -> list[str]:
    """A migration's statements, one by one (`executescript` would commit the open transaction first)."""
    statements, current = [], ""
    *pieces, rest = script.split(";")
    for piece in pieces:
        current += piece + ";"
        if sqlite3.complete_statement(current):  # not a `;` inside a string or a comment
            statements.append(current.strip())
            current = ""
    if (current + rest).strip():
        raise StoreError(f"a migration ends without a semicolon: {(current + rest).strip()[:60]!r}")
    return statements
