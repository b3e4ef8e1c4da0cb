"""bot.store: real SQLite files in tmp_path."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import fields, replace
from pathlib import Path

import pytest

from bot import migrations as store_module
from bot.migrations import MIGRATIONS
from bot.rows import Generation, NewGeneration
from bot.store import Store, StoreError

SNOWFLAKE = 1_234_567_890_123_456_789  # a realistic Discord id, above 2**53


def new(**changes: object) -> NewGeneration:
    base = NewGeneration(
        kind="imagine",
        user_id=1,
        channel_id=10,
        prompt="a lighthouse at dusk",
        negative="",
        scheduler="dpmpp_2m",
        steps=25,
        guidance=7.5,
        model="tiny",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "sdbot.sqlite3") as opened:
        yield opened


def pragma(path: Path, name: str) -> object:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(f"PRAGMA {name}").fetchone()[0]


async def test_open_creates_the_file_in_wal_mode_with_all_migrations(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "sdbot.sqlite3"
    store = await Store.open(path)
    try:
        assert path.is_file()
        assert pragma(path, "journal_mode") == "wal"  # WAL is persistent, so a fresh connection sees it
        assert pragma(path, "user_version") == len(MIGRATIONS) >= 1
    finally:
        await store.close()


async def test_reopen_keeps_rows_and_migrations_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "sdbot.sqlite3"
    async with await Store.open(path) as store:
        first = await store.add(new(prompt="kept"))
    with closing(sqlite3.connect(path)) as db:
        schema = db.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    for _ in range(2):
        async with await Store.open(path) as store:
            kept = await store.get(first)
            assert kept is not None and kept.prompt == "kept"
            assert await store.add(new()) > first
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
    assert pragma(path, "user_version") == len(MIGRATIONS)


async def test_a_failed_migration_rolls_back_and_a_later_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sdbot.sqlite3"
    async with await Store.open(path) as store:
        await store.add(new())
    broken = "CREATE TABLE extra (x INTEGER); INSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        await Store.open(path)
    assert pragma(path, "user_version") == len(MIGRATIONS)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchall() == []

    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, "CREATE TABLE extra (x INTEGER);"])
    async with await Store.open(path) as store:
        assert await store.count_for_user(1) == 1
    assert pragma(path, "user_version") == len(MIGRATIONS) + 1


async def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sdbot.sqlite3"
    async with await Store.open(path):
        pass
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this sdbot"):
        await Store.open(path)


PROMPTS = [
    "'; DROP TABLE generations; --",
    'Robert"); DELETE FROM generations WHERE ("1"="1',
    "naïve café, 東京の夜, Ωμέγα, עברית",
    "🚀 rocket 👩‍👩‍👧 family 🏳️‍🌈 flag",
    "line one\nline two\ttabbed \\ backslash ? :name $1",
]


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_add_get_roundtrip_of_every_field(store: Store, prompt: str) -> None:
    parent = await store.add(new())
    init = bytes(range(256)) * 4  # includes NUL bytes
    request = NewGeneration(
        kind="variation",
        user_id=SNOWFLAKE,
        guild_id=SNOWFLAKE + 1,
        channel_id=SNOWFLAKE + 2,
        interaction_id=SNOWFLAKE + 3,
        prompt=prompt,
        negative=prompt[::-1],
        scheduler="euler_a",
        steps=30,
        guidance=6.25,
        width=640,
        height=384,
        count=3,
        strength=0.6,
        seed=2**32 - 1,
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        init_image=init,
        parent_id=parent,
    )
    before = time.time()
    gen_id = await store.add(request)
    got = await store.get(gen_id)
    assert got is not None
    for f in fields(NewGeneration):
        assert getattr(got, f.name) == getattr(request, f.name), f.name
    assert got.id == gen_id
    assert got.status == "queued" and not got.finished
    assert got.message_id is None and got.reason is None
    assert got.seeds == [] and got.timings == {} and got.notices == []
    assert before <= got.created_at <= time.time()
    assert got.started_at is None and got.finished_at is None
    assert "init_image" not in repr(got) and "init_image" not in repr(request)
    assert await store.count_for_user(SNOWFLAKE) == 1  # the table is still there


async def test_get_missing_row(store: Store) -> None:
    assert await store.get(12345) is None


async def test_constraints_reject_bad_rows(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        await store.add(new(parent_id=999))  # foreign_keys=ON
    with pytest.raises(sqlite3.IntegrityError):
        await store.add(new(kind="upscale"))
    assert await store.count_for_user(1) == 0


async def test_done_path(store: Store) -> None:
    gen_id = await store.add(new(seed=42))
    assert await store.mark_running(gen_id)
    assert not await store.mark_running(gen_id)  # already running
    running = await store.get(gen_id)
    assert running is not None and running.status == "running" and running.started_at is not None

    timings = {"encode": 0.01, "unet": 1.5, "decode": 0.2}
    assert await store.mark_done(
        gen_id, seeds=[42, 43], width=512, height=512, timings=timings, notices=["prompt truncated…"], message_id=7
    )
    done = await store.get(gen_id)
    assert done is not None
    assert done.status == "done" and done.finished
    assert (done.seed, done.seeds, done.width, done.height) == (42, [42, 43], 512, 512)
    assert done.timings == timings and done.notices == ["prompt truncated…"] and done.message_id == 7
    assert done.finished_at is not None and done.finished_at >= running.started_at

    # A late failure, cancel or restart must not change a finished row.
    assert not await store.mark_failed(gen_id, "late error")
    assert not await store.mark_cancelled(gen_id)
    assert not await store.mark_running(gen_id)
    assert not await store.mark_done(gen_id, seeds=[1], width=8, height=8, timings={}, notices=[])
    assert await store.get(gen_id) == done


async def test_mark_done_resolves_a_random_seed(store: Store) -> None:
    gen_id = await store.add(new())
    await store.mark_running(gen_id)
    await store.mark_done(gen_id, seeds=[777, 778], width=64, height=96, timings={}, notices=[], message_id=99)
    done = await store.get(gen_id)
    assert done is not None and done.seed == 777 and done.message_id == 99


async def test_failed_and_cancelled_are_final(store: Store) -> None:
    failed = await store.add(new())
    await store.mark_running(failed)
    assert await store.mark_failed(failed, "out of memory")
    cancelled = await store.add(new())
    assert await store.mark_cancelled(cancelled)
    for gen_id, status, reason in ((failed, "failed", "out of memory"), (cancelled, "cancelled", "cancelled")):
        assert not await store.mark_running(gen_id)
        assert not await store.mark_done(gen_id, seeds=[1], width=8, height=8, timings={}, notices=[])
        assert not await store.mark_failed(gen_id, "other")
        assert not await store.mark_cancelled(gen_id, "other")
        row = await store.get(gen_id)
        assert row is not None and (row.status, row.reason) == (status, reason) and row.finished_at is not None


async def test_history_is_newest_first_paginated_and_per_user(store: Store) -> None:
    mine = []
    for i in range(7):
        mine.append(await store.add(new(user_id=1, prompt=f"mine {i}")))
        await store.add(new(user_id=2, prompt=f"theirs {i}"))
    assert await store.count_for_user(1) == 7
    assert await store.count_for_user(2) == 7
    assert await store.count_for_user(3) == 0

    pages = [await store.history(1, limit=3, offset=offset) for offset in (0, 3, 6, 9)]
    assert [[g.id for g in page] for page in pages] == [mine[6:3:-1], mine[3:0:-1], mine[:1], []]
    assert all(g.user_id == 1 for page in pages for g in page)
    assert [g.id for g in await store.history(1)] == mine[::-1]  # default limit 10
    assert await store.history(3) == []
    with pytest.raises(ValueError):
        await store.history(1, limit=0)
    with pytest.raises(ValueError):
        await store.history(1, offset=-1)


async def test_fail_unfinished(store: Store) -> None:
    done = await store.add(new())
    await store.mark_running(done)
    await store.mark_done(done, seeds=[1], width=8, height=8, timings={}, notices=[])
    queued = await store.add(new())
    cancelled = await store.add(new())
    await store.mark_cancelled(cancelled)
    running = await store.add(new())
    await store.mark_running(running)
    queued_later = await store.add(new(user_id=2))

    failed = await store.fail_unfinished("the bot restarted")
    assert [g.id for g in failed] == [queued, running, queued_later]
    assert all(g.status == "failed" and g.reason == "the bot restarted" for g in failed)
    for g in failed:
        assert await store.get(g.id) == g  # what it returns is what it stored
    assert await store.fail_unfinished("again") == []

    done_row, cancelled_row = await store.get(done), await store.get(cancelled)
    assert done_row is not None and done_row.status == "done"
    assert cancelled_row is not None and cancelled_row.status == "cancelled"


async def test_concurrent_writes_through_one_connection(store: Store) -> None:
    ids = await asyncio.gather(*(store.add(new(prompt=f"p{i}")) for i in range(40)))
    assert len(set(ids)) == 40
    await asyncio.gather(*(store.mark_running(i) for i in ids[:20]), store.fail_unfinished("shutdown"))
    rows = [await store.get(i) for i in ids]
    assert all(isinstance(row, Generation) and row.status == "failed" for row in rows)


async def test_writes_are_committed_for_other_readers(store: Store) -> None:
    gen_id = await store.add(new(prompt="visible"))
    with closing(sqlite3.connect(store.path)) as db:
        assert db.execute("SELECT prompt FROM generations WHERE id = ?", (gen_id,)).fetchone() == ("visible",)


async def test_processes_starting_together_on_a_new_file_migrate_it_once(tmp_path: Path) -> None:
    """A bot and `sdbot --check` (or two bots) opening one new database at the same moment: the write lock is
    taken before the version is read, so the second waits and finds the migrations done."""
    path = tmp_path / "sdbot.sqlite3"
    stores = await asyncio.gather(*(Store.open(path) for _ in range(8)))
    for store in stores:
        await store.close()
    assert pragma(path, "user_version") == len(MIGRATIONS)
    async with await Store.open(path) as store:
        assert await store.add(new()) > 0
