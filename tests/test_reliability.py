"""Nothing is lost across restarts, and a stop signal shuts the bot down cleanly.

The crash and signal tests run the real bot (`python -m bot`) in a child process against the fake Discord, with the
tiny model and a SQLite file, and kill it with SIGKILL at seeded random moments: mid-generation, just after it
posted a result (before it recorded it), and in a burst of new requests (while it writes their rows). After every
kill the database is intact and no request is missing; after the last restart every request has ended where its
user can see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import signal
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import sdengine
from bench.load import run_load
from bot.app import STOPPING
from bot.recovery import GIVEN_UP
from bot.rows import NewGeneration, Received
from bot.store import Store
from sdengine import Model
from tests.botharness import GatedUNet, Harness, custom_ids, fake_fixture, result_id, write_settings
from tests.botprocess import BotProcess, bot_config
from tests.fakediscord import FakeDiscord, FakeInteraction, FakeMessage

__all__ = ["fake_fixture"]  # used by name

SEED = 20240605
SHUT_DOWN = "The bot shut down before this request finished"
LOST = "was lost when the bot restarted before it started"


@pytest_asyncio.fixture(name="server")
async def server_fixture() -> AsyncIterator[FakeDiscord]:
    """A fake Discord for a bot in a child process. Unlike `fake`, it does not fail a test on logged errors: a
    killed client leaves requests cut off in the middle, which the fake's web server logs."""
    async with FakeDiscord() as fake:
        yield fake


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A short-lived second connection, so that it never holds a lock the bot needs."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as connection:
        return connection.execute(sql, params).fetchall()


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` (the database has no change notification to wait on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def is_final(message: FakeMessage, gen_id: int) -> bool:
    """A message that shows how generation `gen_id` ended: its result, or a sentence without a Cancel button."""
    if message.deleted:
        return False
    if result_id(message) == gen_id:
        return True
    return f"**#{gen_id}** ·" in message.content and not any(c.endswith(":cancel") for c in custom_ids(message))


# ---- crashes ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KillRun:
    """The state of the kill test between restarts."""

    fake: FakeDiscord
    db: Path
    rng: random.Random
    sent: list[FakeInteraction] = dataclasses.field(default_factory=list)
    kills: Counter[str] = dataclasses.field(default_factory=Counter)
    # What the kills interrupted, for the summary: generation or interaction ids.
    killed_running: set[int] = dataclasses.field(default_factory=set)
    killed_before_row: set[int] = dataclasses.field(default_factory=set)
    killed_before_done: set[int] = dataclasses.field(default_factory=set)

    async def send(self, count: int, steps: tuple[int, int]) -> list[FakeInteraction]:
        fake = self.fake
        users = [fake.alice, fake.bob, fake.carol, fake.admin]
        new = []
        for _ in range(count):
            options = {"prompt": f"request {len(self.sent)}", "steps": self.rng.randint(*steps)}
            new.append(await fake.slash_command("imagine", options, user=self.rng.choice(users)))
            self.sent.append(new[-1])
        return new

    def rows(self) -> dict[int, tuple[int, str]]:
        """interaction id -> (generation id, status)."""
        return {iid: (gid, status) for gid, iid, status in query(self.db, SELECT_ROWS)}

    def told_lost(self, inter: FakeInteraction) -> bool:
        """Whether the bot told the user that this request was lost before it was logged."""
        prompt = f"`request {self.sent.index(inter)}`"
        return any(LOST in m.content and prompt in m.content for m in self.fake.messages)

    def receipts(self) -> set[int]:
        return {iid for (iid,) in query(self.db, "SELECT interaction_id FROM received")}


SELECT_ROWS = "SELECT id, interaction_id, status FROM generations WHERE interaction_id IS NOT NULL"


async def kill_at(moment: str, run: KillRun, bot: BotProcess) -> None:
    """Send new requests, then SIGKILL the bot at `moment`."""
    fake, rng = run.fake, run.rng
    if moment == "burst":  # while it writes the rows of new requests
        new = await run.send(4, (3, 8))
        await fake.wait_for(lambda: sum(i.callback is not None for i in new) >= 2, 30)
    elif moment == "upload":  # just after a result went out, before its row says done
        start = len(fake.requests)

        def result_posted() -> bool:
            return any(f.filename.startswith("sdbot-") for r in fake.requests[start:] for f in r.files)

        await run.send(2, (3, 6))
        await fake.wait_for(result_posted, 60)
    elif moment == "running":  # mid-generation
        await run.send(2, (30, 50))
        await wait_until(lambda: any(s == "running" for _, s in run.rows().values()), 60, "a running generation")
        await asyncio.sleep(rng.uniform(0, 0.3))  # somewhere in its steps
    else:  # any time at all
        await run.send(2, (3, 12))
        await asyncio.sleep(rng.uniform(0, 2))
    bot.kill()


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_no_request(server: FakeDiscord, tmp_path: Path) -> None:
    fake = server
    config = bot_config(tmp_path, fake, max_pending_per_user=50, max_queue=200)
    run = KillRun(fake, tmp_path / "sdbot.sqlite3", random.Random(SEED))
    moments = ["burst", "upload", "running", "random", "running", "random"]  # 6 kills, mid-job ones twice
    run.rng.shuffle(moments)
    known_rows: set[int] = set()

    for moment in moments:
        async with BotProcess.start(fake, config, tmp_path / "bot.log") as bot:
            await kill_at(moment, run, bot)
            assert await bot.wait() == -signal.SIGKILL

        assert query(run.db, "PRAGMA integrity_check") == [("ok",)]
        rows, receipts = run.rows(), run.receipts()
        ids = {gid for gid, _ in rows.values()}
        assert known_rows <= ids, f"rows lost: {known_rows - ids}"
        known_rows = ids
        for inter in run.sent:
            if inter.callback is not None:  # acknowledged: the user saw "thinking…", so it must be on record
                on_record = inter.id in rows or inter.id in receipts or run.told_lost(inter)
                assert on_record, f"interaction {inter.id} is on no record"
        # What the kill interrupted, for the summary.
        run.kills[moment] += 1
        run.killed_running |= {g for g, s in rows.values() if s == "running"}
        run.killed_before_row |= receipts - set(rows)
        posted = {result_id(m) for m in fake.messages}
        run.killed_before_done |= {g for g, s in rows.values() if g in posted and s != "done"}

    # The last start: everything interrupted ends, where its user can see it.
    acknowledged = [i for i in run.sent if i.callback is not None]

    def everything_ended() -> bool:
        rows = run.rows()
        for inter in acknowledged:
            if inter.id in rows:
                gen_id, status = rows[inter.id]
                if status in ("queued", "running") or not any(is_final(m, gen_id) for m in fake.messages):
                    return False
            elif not run.told_lost(inter):  # acknowledged, crashed before its row: asked to send it again
                return False
        return True

    async with BotProcess.start(fake, config, tmp_path / "bot.log") as bot:
        await wait_until(everything_ended, 180, "every request ended visibly")
        bot.send_signal(signal.SIGTERM)
        assert await bot.wait() == 0

    rows = run.rows()
    statuses = Counter(status for _, status in rows.values())
    # A resumed run used the stored seed: the picture is the one the request would have made.
    for message in fake.messages:
        gen_id = result_id(message)
        if gen_id is not None and message.attachments:
            ((seed,),) = query(run.db, "SELECT seed FROM generations WHERE id = ?", (gen_id,))
            assert f"Seed: {seed}," in (sdengine.read_parameters(message.attachments[0].data) or "")
    reasons = Counter(r for (r,) in query(run.db, "SELECT reason FROM generations WHERE status = 'failed'"))
    print(
        f"\nkill test: {sum(run.kills.values())} SIGKILLs {dict(run.kills)}; {len(run.sent)} requests sent, "
        f"{len(acknowledged)} acknowledged (the rest died unread: Discord shows 'did not respond'). Interrupted: "
        f"{len(run.killed_running)} generations while running, {len(run.killed_before_done)} after posting the "
        f"result but before recording it, {len(run.killed_before_row)} requests after their receipt but before "
        f"their row ({len(run.killed_before_row & {i.id for i in acknowledged})} of them acknowledged). "
        f"End: rows {dict(statuses)}, failed because {dict(reasons)}; "
        f"{sum(run.told_lost(i) for i in acknowledged)} users asked to send again."
    )
    assert run.killed_running, "no kill landed mid-generation"
    assert set(statuses) <= {"done", "failed"}


# ---- load ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_burst_of_requests_is_acknowledged_in_time_and_each_ends_visibly(tmp_path: Path) -> None:
    """A smaller `bench/load.py`: 60 requests from 15 users within 5 s."""
    report = await run_load(tmp_path, requests=60, users=15, seconds=5)
    print("\n" + report.summary())
    assert report.callbacks_refused == 0 and max(report.latencies) < 3.0
    assert not report.others
    assert report.images + sum(report.rejections.values()) == 60 and report.images > 0
    assert report.rows == 60
    assert report.exit_code == 0


# ---- stop signals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_fails_the_rest_with_a_message_and_closes_the_database(
    server: FakeDiscord, tmp_path: Path, stop: signal.Signals
) -> None:
    fake = server
    config = bot_config(tmp_path, fake)
    db = tmp_path / "sdbot.sqlite3"
    async with BotProcess.start(fake, config, tmp_path / "bot.log") as bot:
        running = await fake.slash_command("imagine", {"prompt": "a long walk", "steps": 50})
        waiting = [await fake.slash_command("imagine", {"prompt": f"wait {i}"}, user=fake.bob) for i in range(2)]
        await wait_until(
            lambda: (
                [s for (s,) in query(db, "SELECT status FROM generations ORDER BY id")]
                == ["running", "queued", "queued"]
            ),
            60,
            "one running and two queued",
        )
        bot.send_signal(stop)
        assert await bot.wait() == 0, bot.log_tail()

    assert f"{stop.name}: shutting down cleanly" in bot.log_tail(80)
    # The database was closed cleanly: the last connection to close checkpoints the WAL and removes it.
    assert not Path(f"{db}-wal").exists()
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    rows = query(db, "SELECT status, reason FROM generations ORDER BY id")
    assert len(rows) == 3 and all(status == "failed" and SHUT_DOWN in reason for status, reason in rows)
    for inter in [running, *waiting]:  # each user was told, on the message they were watching
        assert any(SHUT_DOWN in m.content and not m.components for m in inter.messages)


async def test_shutdown_refuses_new_requests_and_finishes_the_step_in_flight(
    fake: FakeDiscord, tmp_path: Path, tiny: Model
) -> None:
    unet = GatedUNet(tiny.unet)
    harness = Harness(fake, write_settings(tmp_path, fake), dataclasses.replace(tiny, unet=unet))
    async with harness.running() as bot:
        unet.entered.clear()
        unet.gate.clear()
        running = await fake.slash_command("imagine", {"prompt": "a long walk"})
        waiting = await fake.slash_command("imagine", {"prompt": "a short wait"}, user=fake.bob)
        await waiting.wait_message(lambda m: "queued" in m.content)
        assert await asyncio.to_thread(unet.entered.wait, 30)  # the worker is inside a step

        closing = asyncio.create_task(bot.close())  # what SIGTERM does
        late = await fake.slash_command("imagine", {"prompt": "too late"}, user=fake.carol)
        refused = await late.wait_message(lambda m: m.ephemeral)
        assert refused.content == STOPPING
        unet.gate.set()
        await closing

    assert unet.started == unet.finished  # the step in flight ran to its end
    rows = await harness.rows_of(fake.alice.id) + await harness.rows_of(fake.bob.id)
    assert len(rows) == 2 and all(r.status == "failed" and SHUT_DOWN in (r.reason or "") for r in rows)
    assert await harness.rows_of(fake.carol.id) == []  # refused before it became a request
    for inter in (running, waiting):
        assert any(SHUT_DOWN in m.content for m in inter.messages)


# ---- recovery, in detail ---------------------------------------------------------------------------------------


async def test_after_a_crash_each_request_is_run_again_given_up_or_reported(
    server: FakeDiscord, tmp_path: Path
) -> None:
    """The three ways back from a crash, set up in the database as a crash leaves them, then one start."""
    fake = server
    config = bot_config(tmp_path, fake)
    db = tmp_path / "sdbot.sqlite3"

    def request(prompt: str, seed: int) -> NewGeneration:
        return NewGeneration(
            kind="imagine",
            user_id=fake.alice.id,
            guild_id=fake.guild.id,
            channel_id=fake.channel.id,
            prompt=prompt,
            negative="",
            scheduler="ddim",
            steps=3,
            guidance=7.5,
            model="tiny",
            seed=seed,
        )

    async with await Store.open(db) as store:
        resumed = await store.add(request("a sunrise", 42))  # was running during one crash
        await store.mark_running(resumed)
        # Started three times, and each start took the process down while it was still queued (decoding its init
        # image, encoding its prompt): never running, yet it must not be started a fourth time.
        poison = await store.add(request("a poison pill", 1))
        # Acknowledged, but the crash came before its row was written.
        await store.add_received(Received(777, fake.bob.id, fake.guild.id, fake.channel.id, "imagine", "a ghost", 0.0))
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        connection.execute("UPDATE generations SET attempts = 3 WHERE id = ?", (poison,))

    async with BotProcess.start(fake, config, tmp_path / "bot.log") as bot:
        result = await fake.wait_for(lambda: next((m for m in fake.messages if result_id(m) == resumed), None), 60)
        given_up = await fake.wait_for(lambda: next((m for m in fake.messages if "down 3 times" in m.content), None))
        lost = await fake.wait_for(lambda: next((m for m in fake.messages if LOST in m.content), None))
        bot.send_signal(signal.SIGTERM)
        assert await bot.wait() == 0

    # Run again with its stored parameters and seed, in a new message that says whose it is and pings nobody.
    assert result.content.startswith(f"-# <@{fake.alice.id}>'s request from <t:")
    assert f"**#{resumed}** · seed 42" in result.content and result.interaction_id is None
    assert "Seed: 42," in (sdengine.read_parameters(result.attachments[0].data) or "")
    # Given up, with a Reroll button.
    assert given_up.content.startswith(f"**#{poison}** · <@{fake.alice.id}>")
    assert custom_ids(given_up) == [f"gen:{poison}:reroll"]
    # Asked to send it again.
    assert lost.content == f"<@{fake.bob.id}>: your /imagine `a ghost` {LOST}: please send it again."
    for message in (result, given_up, lost):
        assert message.raw["allowed_mentions"]["parse"] == [] and message.reference is None
    rows = query(db, "SELECT id, status, reason, attempts FROM generations ORDER BY id")
    assert rows == [(resumed, "done", None, 2), (poison, "failed", GIVEN_UP, 3)]
    assert query(db, "SELECT * FROM received") == []
