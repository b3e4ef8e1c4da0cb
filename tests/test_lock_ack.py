"""Acknowledge first, then touch the database: every entry point answers Discord within its 3 seconds while another
process holds the SQLite database's lock for 10 seconds, then ends visibly (its work done once the lock clears, or
one plain "busy" sentence), and nothing hangs.

The lock is taken by a second Python process with the standard sqlite3 module, as another program on the host
would: `BEGIN EXCLUSIVE` plus a write, held 10 s, then rolled back. The bot runs SQLite in WAL mode, where that is the
strongest lock another process can get while the bot is connected: writers wait, readers go on. (`PRAGMA
locking_mode=EXCLUSIVE` would also shut readers out, but in WAL mode it needs the file to itself, which it never gets
while the bot holds its connection: the locker waits out its timeout and gets SQLITE_BUSY.)

Each ack latency is measured on the fake Discord's side, from the dispatch of the INTERACTION_CREATE to the arrival
of the interaction's first callback (`CallbackRecord.latency`). Run with `pytest -s` to see the worst one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bot.replies import database_trouble
from tests.botharness import GatedUNet, Harness, custom_ids, fake_fixture, harness_fixture, result_id
from tests.fakediscord import FakeInteraction, FakeMessage, FakeUser

__all__ = ["fake_fixture", "harness_fixture"]  # fixtures used by name

LOCK_SECONDS = 10.0
ACK_DEADLINE = 3.0  # Discord's: an interaction not acknowledged by then is dropped
PAUSED = "Paused: running jobs finish, and queued ones wait for /admin resume."
NOT_RECORDED = "My database could not record it right now, so only the bot's log file has it."
WAIT = 60.0  # ceiling for an answer: generous, for a loaded machine; a pass takes seconds

# The other process: takes the write lock with a real write, says so on stdout, holds it, then lets go.
LOCKER = """
import sqlite3, sys, time
db, seconds = sys.argv[1], float(sys.argv[2])
connection = sqlite3.connect(db, isolation_level=None, timeout=30)
connection.execute("BEGIN EXCLUSIVE")
connection.execute("CREATE TABLE lock_probe (x)")  # a write: the lock is held by a transaction that changed pages
print("locked", flush=True)
time.sleep(seconds)
connection.execute("ROLLBACK")  # leaves the bot's database as it was
connection.close()
print("released", flush=True)
"""


def busy_sentence() -> str:
    """The sentence for a request that the busy database refused (bot/replies.py)."""
    error = sqlite3.OperationalError("database is locked")
    error.sqlite_errorname = "SQLITE_BUSY"
    return database_trouble(error)


@contextlib.asynccontextmanager
async def locked_by_another_process(db: Path, seconds: float) -> AsyncIterator[subprocess.Popen[str]]:
    """Another process holds the database's lock for `seconds`; entered once it holds it."""
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(locker.stdout.readline), WAIT)
        assert line.strip() == "locked", f"the locker did not get the lock: {line!r}, exit {locker.poll()}"
        yield locker
    except BaseException:
        locker.kill()
        raise
    finally:
        await asyncio.to_thread(locker.wait, WAIT)
        assert locker.stdout is not None
        locker.stdout.close()


def write_refused(db: Path) -> bool:
    """Whether a write from a third connection is refused at once: the lock is really held."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None, timeout=0)) as connection:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        connection.execute("ROLLBACK")
        return False


def finished(message: FakeMessage) -> bool:
    """A finished result, with its buttons."""
    return result_id(message) is not None


def is_progress(message: FakeMessage) -> bool:
    """A queued or running generation's message: it carries the Cancel button."""
    return any(custom_id.endswith(":cancel") for custom_id in custom_ids(message))


@dataclasses.dataclass
class Entry:
    """One entry point driven while the database is locked, and how it may end.

    It ends with an answer of its own (a message that is neither a "thinking" placeholder nor progress), or, for a
    press that updates the message it is on, with `effect` showing on that message. An answer must be the finished
    work (`done`) or, where nothing was done yet (`busy_ok`), the plain busy sentence.
    """

    name: str
    done: Callable[[FakeMessage], bool]
    inter: FakeInteraction | None = None  # None for a reply, which is no interaction
    reply: FakeMessage | None = None
    effect: Callable[[], bool] = lambda: False
    busy_ok: bool = True

    def answer(self, messages: list[FakeMessage]) -> FakeMessage | None:
        if self.inter is not None:
            own = [m for m in self.inter.messages if m is not self.inter.source_message]
        else:
            own = [m for m in messages if m.reference is self.reply]
        return next((m for m in own if not m.loading and not m.deleted and not is_progress(m)), None)

    def ended(self, messages: list[FakeMessage]) -> bool:
        return self.effect() or self.answer(messages) is not None

    def outcome(self, messages: list[FakeMessage], busy: str) -> str:
        """ "done" or "busy"; fails the test on any other end."""
        answer = self.answer(messages)
        if answer is None:
            assert self.effect(), f"{self.name} has not ended"
            return "done"
        if answer.content == busy and self.busy_ok:
            return "busy"
        assert self.done(answer), (self.name, answer.content)
        return "done"


async def test_every_entry_point_acknowledges_within_3_s_while_another_process_locks_the_database(
    harness: Harness,
) -> None:
    unet = GatedUNet(harness.model.unet)
    harness = dataclasses.replace(harness, model=dataclasses.replace(harness.model, unet=unet))
    fake, db = harness.fake, harness.settings.storage.database
    bob, carol, admin = fake.bob, fake.carol, fake.admin
    mallory = FakeUser("mallory")  # only ever an option: blocking them changes nobody's requests here
    async with harness.running() as bot:
        # Before the lock: results to press buttons on (one of them to delete), and a /history page to turn. Two
        # steps each, which their rerolls and variations keep (at strength 0.75, one step): the lock is the point.
        kept = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a lighthouse", "steps": 2}))
        doomed = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a sandcastle", "steps": 2}))
        kept_id, doomed_id = result_id(kept) or 0, result_id(doomed) or 0
        for gen_id in (kept_id, doomed_id):
            await harness.wait_row(gen_id, lambda r: r.status == "done")
        history = await (await fake.slash_command("history")).wait_message(timeout=WAIT)
        older, history_edits = custom_ids(history)[1], history.edits  # [Newer, Older]
        # And a job held mid-run (3 steps: a cancel takes effect at the step after the held one), whose progress
        # message carries the Cancel button.
        held = await fake.slash_command("imagine", {"prompt": "a slow tide"})
        await unet.hold()
        progress = await held.wait_message(is_progress, timeout=WAIT)
        held_id = int(custom_ids(progress)[0].split(":")[1])
        await harness.wait_row(held_id, lambda r: r.status == "running")  # its last write before the lock

        entries: list[Entry] = []

        async def drive(
            name: str, start: Awaitable[FakeInteraction], done: Callable[[FakeMessage], bool], **more: Any
        ) -> None:
            entries.append(Entry(name, done, inter=await start, **more))

        def said(text: str) -> Callable[[FakeMessage], bool]:
            return lambda m: text in m.content

        async with locked_by_another_process(db, LOCK_SECONDS) as locker:
            assert write_refused(db)
            # Pause first, and resume once it is paused, so the two cannot swap places on the way. Both act in
            # memory before they write to the audit table, so they must never answer "busy".
            await drive("/admin pause", fake.slash_command("admin pause", user=admin), said("Paused"), busy_ok=False)
            await fake.wait_for(lambda: bot.executor.stats().paused or None, WAIT)
            await drive("/admin resume", fake.slash_command("admin resume", user=admin), said("Resumed"), busy_ok=False)
            await drive("/imagine", fake.slash_command("imagine", {"prompt": "a locked door", "steps": 2}), finished)
            await drive("/reroll", fake.slash_command("reroll", {"id": kept_id}, user=bob), finished)
            await drive("/history", fake.slash_command("history"), said("Your generations"))
            await drive("/queue", fake.slash_command("queue", user=carol), said("waiting"))
            await drive(
                "/cancel", fake.slash_command("cancel", user=admin), said("You have nothing queued or running.")
            )
            await drive(
                "/admin cancel",
                fake.slash_command("admin cancel", {"id": kept_id}, user=admin),
                said(f"#{kept_id} is not queued or running."),
            )
            await drive(
                "/admin purge",
                fake.slash_command("admin purge", {"user": mallory}, user=admin),
                said(f"mallory ({mallory.id}) has nothing queued or running."),
                busy_ok=False,
            )
            await drive(
                "/admin block",
                fake.slash_command("admin block", {"user": mallory}, user=admin),
                said(f"Blocked mallory ({mallory.id})."),
            )
            await drive(
                "/admin unblock",
                fake.slash_command("admin unblock", {"user": bob}, user=admin),
                said(f"bob ({bob.id}) is not blocked."),
            )
            await drive(
                "/admin blocked",
                fake.slash_command("admin blocked", user=admin),
                lambda m: "Nobody is blocked." in m.content or "blocked, longest first" in m.content,
            )
            await drive("Reroll button", fake.message_component(f"gen:{kept_id}:reroll", kept, user=carol), finished)
            await drive("Vary button", fake.message_component(f"gen:{kept_id}:vary:0", kept, user=bob), finished)
            await drive(
                "Cancel button",
                fake.message_component(f"gen:{held_id}:cancel", progress),
                said("no longer queued or running"),
                effect=lambda: progress.content == f"**#{held_id}** · cancelled.",
            )
            await drive(
                "Delete button",
                fake.message_component(f"gen:{doomed_id}:delete", doomed),
                lambda m: False,
                effect=lambda: doomed.deleted,
            )
            await drive(
                "History page button",
                fake.message_component(older, history),
                lambda m: False,
                effect=lambda: history.edits > history_edits and "Your generations" in history.content,
            )
            await drive("Make variations", fake.context_menu("Make variations", kept, user=carol), finished)
            reply = await fake.user_message(f"{fake.bot_user.mention} in blue", reply_to=kept)
            entries.append(Entry("reply", finished, reply=reply))

            # Every interaction is acknowledged while the lock is still held.
            interactions = [e for e in entries if e.inter is not None]
            for entry in interactions:
                assert entry.inter is not None
                with contextlib.suppress(TimeoutError):
                    await entry.inter.wait_callback(WAIT)
                assert entry.inter.callbacks, f"{entry.name} was never acknowledged"
            assert locker.poll() is None, "the lock was released before every interaction was acknowledged"
            unet.gate.set()  # the held job sees its cancel at its next step

        assert locker.returncode == 0
        latencies = {e.name: e.inter.callbacks[0].latency for e in interactions if e.inter is not None}
        worst = max(latencies, key=latencies.__getitem__)
        print(f"\nworst ack latency with the database locked by another process: {latencies[worst]:.3f} s ({worst})")
        for entry in interactions:
            assert entry.inter is not None
            first = entry.inter.callbacks[0]
            assert first.status < 300 and first.latency < ACK_DEADLINE, (entry.name, first.latency, first.error)

        # Then each ends visibly, with its work done once the lock cleared or one plain busy sentence: none hangs.
        messages, busy = fake.messages, busy_sentence()
        with contextlib.suppress(TimeoutError):
            await fake.wait_for(lambda: all(e.ended(messages) for e in entries) or None, WAIT)
        assert all(e.ended(messages) for e in entries), [e.name for e in entries if not e.ended(messages)]
        outcomes = {e.name: e.outcome(messages, busy) for e in entries}
        print(f"outcomes: {sorted(outcomes.items())}")
        # The bot's first write under the lock is the pause's audit row: it waits out the busy_timeout (5 s) and
        # fails, and the admin is still told the truth, that the queue is paused.
        pause = entries[0].answer(messages)
        assert pause is not None and pause.content == f"{PAUSED} {NOT_RECORDED}", pause and pause.content
        assert not bot.executor.stats().paused
