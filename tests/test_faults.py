"""Faults, each injected through the fake Discord, an injected model part, a second SQLite connection or the
operating system, and never by patching the bot: what the user sees, and that the bot keeps serving.

The bot runs in-process (the `harness`) with the real discord.py, sockets and SQLite and the tiny model, except for
the full disk, which needs a process of its own to put a file-size limit on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sdengine import Model
from tests.botharness import (
    GatedUNet,
    Harness,
    fake_fixture,
    harness_fixture,
    result_id,
)
from tests.botprocess import BotProcess, bot_config
from tests.fakediscord import FakeDiscord, Fault, RequestRecord

__all__ = ["fake_fixture", "harness_fixture"]  # used by name

if sys.platform == "linux":
    import resource


def gated(harness: Harness) -> tuple[Harness, GatedUNet]:
    unet = GatedUNet(harness.model.unet)
    return dataclasses.replace(harness, model=dataclasses.replace(harness.model, unet=unet)), unet


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """A short-lived second connection, so that it never holds a lock the bot needs."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as connection:
        return connection.execute(sql).fetchall()


async def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll `condition` (the database has no change notification to wait on)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


@contextlib.contextmanager
def database_locked(db: Path) -> Iterator[None]:
    """Another program holds the database's write lock (in WAL mode, readers go on)."""
    connection = sqlite3.connect(db, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


# ---- Discord -----------------------------------------------------------------------------------------------


async def test_a_gateway_drop_mid_job_is_resumed_and_the_result_delivered(harness: Harness) -> None:
    harness, unet = gated(harness)
    fake = harness.fake
    async with harness.running():
        inter = await fake.slash_command("imagine", {"prompt": "a storm"})
        await unet.hold()  # mid-job
        await fake.drop_gateway(None)  # the TCP connection breaks, without a close frame
        # While the bot is away, someone presses /imagine: Discord keeps it and replays it on RESUME.
        during = await fake.slash_command("imagine", {"prompt": "a rainbow"}, user=fake.bob)
        await fake.wait_for(lambda: fake.resume_count == 1, 10)
        unet.gate.set()
        first = await harness.result_of(inter)
        second = await harness.result_of(during)
    assert fake.identify_count == 1  # resumed, not a new session
    for message in (first, second):
        gen_id = result_id(message)
        assert gen_id is not None and (await harness.row(gen_id)).status == "done"
    assert during.callbacks[0].latency < 3


class UploadFault(Fault):
    """`fake.fail_next` for requests that upload a result image only, not the progress edits before it."""

    def matches(self, record: RequestRecord) -> bool:
        return super().matches(record) and any(f.filename.startswith("sdbot-") for f in record.files)


async def test_a_429_on_the_upload_is_waited_out_and_the_result_delivered(harness: Harness) -> None:
    fake = harness.fake
    fault = UploadFault("PATCH", re.compile(r"/messages/@original$"), 429, 1, None, 0.3)
    fake.rest.faults.append(fault)
    async with harness.running():
        inter = await fake.slash_command("imagine", {"prompt": "a crowded street"})
        result = await harness.result_of(inter)
        gen_id = result_id(result)
        row = await harness.wait_row(gen_id or 0, lambda r: r.status == "done")
    assert fault.hits == 1
    uploads = [r for r in fake.requests if any(f.filename.startswith("sdbot-") for f in r.files)]
    assert [r.status for r in uploads] == [429, 200]  # discord.py slept retry_after, then sent it again
    assert uploads[1].at - uploads[0].at >= 0.3
    assert row.message_id == result.id and result.interaction_id == inter.id


async def test_a_job_that_outlives_its_interaction_token_posts_its_result_in_the_channel(harness: Harness) -> None:
    harness, unet = gated(harness)
    fake = harness.fake
    async with harness.running():
        inter = await fake.slash_command("imagine", {"prompt": "a slow sunset"})
        await unet.hold()
        fake.expire_token(inter.token)  # 15 minutes have passed, as far as Discord is concerned
        unet.gate.set()
        result = await harness.wait_channel_result()
        row = await harness.wait_row(result_id(result) or 0, lambda r: r.status == "done")
    assert row.interaction_id == inter.id and row.message_id == result.id
    assert result.interaction_id is None and result.attachments
    assert any(r.status == 401 for r in fake.find_requests("PATCH", r"/messages/@original$"))


async def test_a_result_that_cannot_be_posted_anywhere_is_logged_quietly_and_not_marked_done(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fake, db = harness.fake, harness.settings.storage.database
    # The progress message was deleted (404), and the bot may not send messages in the channel (403).
    deleted = fake.fail_next("PATCH", r"/messages/@original$", 404, times=1000)
    forbidden = fake.fail_next("POST", r"/channels/\d+/messages$", 403, times=1000)
    async with harness.running():
        inter = await fake.slash_command("imagine", {"prompt": "a locked door"})
        await wait_until(lambda: query(db, "SELECT status FROM generations") == [("failed",)])
        (row,) = await harness.rows_of(fake.alice.id)
        assert deleted.hits >= 1 and forbidden.hits >= 1
        # The bot stays up and serves the next request once Discord lets it post again.
        deleted.times = deleted.hits
        forbidden.times = forbidden.hits
        again = await harness.result_of(await fake.slash_command("imagine", {"prompt": "an open door"}))
    # Generated, but nowhere to show it: the row must not say it was delivered.
    assert row.status == "failed" and row.message_id is None and "could not be posted" in (row.reason or "")
    assert result_id(again) is not None and inter.callbacks[0].status == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "bot.output" and r.levelname == "WARNING"]
    assert any("could not post the result" in w and "Missing Permissions" in w for w in warnings)
    # (the `fake` fixture fails the test on any ERROR log line, which would carry a traceback)


async def test_deleting_a_result_that_is_already_gone_is_quiet(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running():
        result = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a soap bubble"}))
        press = f"gen:{result_id(result)}:delete"
        await fake.message_component(press, result)
        await fake.wait_for(lambda: result.deleted)
        again = await fake.message_component(press, result)  # a second click that Discord still delivered
        assert (await again.wait_callback()).status == 200
        await fake.wait_for(lambda: fake.find_requests("DELETE", "@original$")[1:] != [])
    assert not [m for m in again.messages if m.ephemeral and "went wrong" in m.content]


# ---- the engine --------------------------------------------------------------------------------------------


class OutOfMemoryUNet(torch.nn.Module):
    """The real UNet, except that inputs `poisoned` selects raise torch.OutOfMemoryError, as CUDA does."""

    def __init__(self, unet: torch.nn.Module, poisoned: Callable[[torch.Tensor], bool]) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.poisoned = poisoned

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.poisoned(sample):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.unet(sample, *args, **kwargs)


async def test_out_of_memory_in_the_engine_is_one_clear_sentence_and_the_worker_serves_on(
    harness: Harness, tiny: Model
) -> None:
    wide = OutOfMemoryUNet(tiny.unet, lambda x: x.shape[-1] > x.shape[-2])  # only wide pictures "do not fit"
    harness = dataclasses.replace(harness, model=dataclasses.replace(tiny, unet=wide))
    fake = harness.fake
    async with harness.running():
        too_big = await fake.slash_command("imagine", {"prompt": "a panorama", "size": "wide"})
        failed = await too_big.wait_message(lambda m: "out of memory" in m.content)
        fits = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a square"}))
    assert failed.content.endswith("ran out of memory for this request: lower the size or count.")
    assert not failed.components and not failed.attachments
    (square, panorama) = await harness.rows_of(fake.alice.id)
    assert panorama.status == "failed" and "out of memory" in (panorama.reason or "")
    assert square.status == "done" and result_id(fits) == square.id


# ---- the database ------------------------------------------------------------------------------------------


async def test_a_locked_database_refuses_new_requests_clearly_and_retries_status_writes(harness: Harness) -> None:
    harness, unet = gated(harness)
    fake, db = harness.fake, harness.settings.storage.database
    async with harness.running():
        running = await fake.slash_command("imagine", {"prompt": "a lighthouse"})
        await unet.hold()  # its row is written; it waits mid-job
        with database_locked(db):  # longer than the bot's busy_timeout (5 s)
            refused = await fake.slash_command("imagine", {"prompt": "a harbour"}, user=fake.bob)
            answer = await refused.wait_message(lambda m: m.ephemeral, timeout=30)
            unet.gate.set()  # the running job finishes while the lock is still held
            result = await harness.result_of(running)
        # Released: the row's status write, retried, goes through; and the bot serves as before.
        gen_id = result_id(result) or 0
        row = await harness.wait_row(gen_id, lambda r: r.status == "done", timeout=30)
        after = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a boat"}, user=fake.bob))
    assert refused.callbacks[0].latency < 3  # acknowledged in time even though its note could not be written
    assert answer.content == "My database is busy, so I could not take your request: try again in a minute."
    assert row.message_id == result.id
    bob = await harness.rows_of(fake.bob.id)
    assert [(r.prompt, r.status) for r in bob] == [("a boat", "done")]  # the refused one was never logged
    assert result_id(after) == bob[0].id


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux's prlimit")
async def test_a_full_disk_refuses_new_requests_clearly_and_the_bot_stays_up(tmp_path: Path) -> None:
    """The database may not grow: a file-size limit (RLIMIT_FSIZE) put on the running bot process from outside.
    Writes past it fail as on a full disk (SQLite reports an I/O error rather than SQLITE_FULL: the kernel says
    EFBIG, not ENOSPC). `PRAGMA max_page_count` cannot do this: it only limits the connection that sets it."""
    async with FakeDiscord() as fake:
        config = bot_config(tmp_path, fake)
        db = tmp_path / "sdbot.sqlite3"
        wal = tmp_path / "sdbot.sqlite3-wal"
        async with BotProcess.start(fake, config, tmp_path / "bot.log") as bot:
            first = await fake.slash_command("imagine", {"prompt": "a sandcastle"})
            assert result_id(await first.wait_message(lambda m: result_id(m) is not None, timeout=60)) == 1
            await wait_until(lambda: query(db, "SELECT status FROM generations") == [("done",)])
            _, hard = resource.prlimit(bot.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(bot.pid, resource.RLIMIT_FSIZE, (wal.stat().st_size, hard))

            refused = await fake.slash_command("imagine", {"prompt": "a flood"}, user=fake.bob)
            answer = await refused.wait_message(lambda m: m.ephemeral, timeout=30)

            resource.prlimit(bot.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space is freed
            later = await fake.slash_command("imagine", {"prompt": "a dry day"}, user=fake.carol)
            await later.wait_message(lambda m: result_id(m) is not None, timeout=60)
            bot.send_signal(signal.SIGTERM)
            assert await bot.wait() == 0
    assert refused.callbacks[0].status == 200
    assert answer.content == (
        "My database cannot be written to right now (the disk may be full), so I could not take your request."
    )
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert query(db, "SELECT prompt, status FROM generations ORDER BY id") == [
        ("a sandcastle", "done"),
        ("a dry day", "done"),
    ]
    assert "disk I/O error" in bot.log_tail(200)
