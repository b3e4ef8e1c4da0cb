"""Hardening, each item with a test that fails if it breaks:

1. A finished picture is always delivered: connection resets on the progress edits and on the upload only stop the
   progress; the result is tried again, then posted in the channel, and its row says done only once it went out.
2. Only what Discord serves is fetched: no request ever reaches another host (attachment URL, embed image, redirect),
   and the size cap holds while the bytes stream in, whatever the attachment claims.
3. Refused requests cost nothing: fifty refused image-to-image requests with 5 MiB attachments leave fifty small
   rows and no image in the database.
4. An init image's size follows `limits.max_side`.
5. A reply to someone else's image: one sentence about "Make variations" without the Message Content intent,
   variations with it.
6. A button press or a reply acknowledged before its row exists is reported after a crash.

The bot runs in-process (the `harness`) against the fake Discord with the tiny model; faults come through the fake,
a second local web server, an injected model part or an injected fake channel, never by patching the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import discord
import pytest
import pytest_asyncio
from aiohttp import web
from PIL import Image

from bot import output as output_module
from bot.cogs.variations import HIDDEN
from bot.output import Output
from bot.recovery import RECEIVED_NAMES
from bot.replies import plain
from bot.rows import NewGeneration, Received
from bot.store import Store
from tests.botharness import (
    GatedUNet,
    Harness,
    fake_fixture,
    harness_fixture,
    png,
    result_id,
    sentence,
    write_settings,
)
from tests.fakediscord import RESET, FakeAttachment, FakeDiscord, FakeMessage, Fault, RequestRecord

__all__ = ["fake_fixture", "harness_fixture"]  # fixtures used by name

WAIT = 60.0  # a ceiling for anything to happen; a pass takes a fraction of it
ORIGINAL = re.compile(r"/messages/@original$")
CHANNEL_POST = re.compile(r"/channels/\d+/messages$")
NOT_DISCORD = "I only download images that Discord hosts: attach the image instead."
LOST = "was lost when the bot restarted before it started: please send it again."


# ---- helpers -------------------------------------------------------------------------------------------------


def is_upload(record: RequestRecord) -> bool:
    """Whether a request uploads a result image (a progress edit carries at most a preview)."""
    return any(f.filename.startswith("sdbot-") for f in record.files)


@dataclass(eq=False)
class UploadFault(Fault):
    """`fake.fail_next` narrowed to the requests that upload a result (`uploads=True`) or to the others."""

    uploads: bool = True

    def matches(self, record: RequestRecord) -> bool:
        return super().matches(record) and is_upload(record) == self.uploads


def reset(pattern: re.Pattern[str], times: int, *, method: str = "PATCH", uploads: bool = True) -> UploadFault:
    return UploadFault(method, pattern, RESET, times, None, None, uploads=uploads)


@dataclass(eq=False)
class Answer(Fault):
    """Answers the matching requests with a response of the test's own: a redirect, an endless body."""

    make: Callable[[], web.Response] = field(kw_only=True)

    def response(self) -> web.Response:
        self.hits += 1
        return self.make()


def with_limits(harness: Harness, **limits: Any) -> Harness:
    settings = harness.settings
    return dataclasses.replace(
        harness, settings=dataclasses.replace(settings, limits=dataclasses.replace(settings.limits, **limits))
    )


def gated(harness: Harness) -> tuple[Harness, GatedUNet]:
    unet = GatedUNet(harness.model.unet)
    return dataclasses.replace(harness, model=dataclasses.replace(harness.model, unet=unet)), unet


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A short-lived second connection, so that it never holds a lock the bot needs."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as connection:
        return connection.execute(sql, params).fetchall()


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `condition` (the database has no change notification to wait on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def bot_replies_to(fake: FakeDiscord, message: FakeMessage) -> list[FakeMessage]:
    return [m for m in fake.messages if m.author is fake.bot_user and m.reference is message and not m.deleted]


async def only_reply(fake: FakeDiscord, message: FakeMessage) -> str:
    """The text of the bot's one plain reply to a user's message."""
    answer = await fake.wait_for(lambda: next(iter(bot_replies_to(fake, message)), None), WAIT)
    assert bot_replies_to(fake, message) == [answer]
    assert not answer.attachments and not answer.components and answer.mentions == []
    return answer.content


def image(width: int, height: int, **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(buffer, "PNG", **params)
    return buffer.getvalue()


@dataclass
class OtherServer:
    """A second web server on 127.0.0.1 that serves a PNG at any path, and logs every request it gets."""

    url: str
    requests: list[str] = field(default_factory=list)


@pytest_asyncio.fixture(name="other")
async def other_fixture() -> AsyncIterator[OtherServer]:
    server = OtherServer("")

    async def serve(request: web.Request) -> web.Response:
        server.requests.append(request.path_qs)
        return web.Response(body=png("green"), headers={"Content-Type": "image/png"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        await runner.cleanup()


# ---- 1. a finished picture is always delivered ---------------------------------------------------------------


class ScriptedInteraction:
    """An injected interaction whose `edit_original_response` raises the scripted errors in turn, then succeeds."""

    def __init__(self, *errors: BaseException) -> None:
        self.id = 1
        self.created_at = discord.utils.utcnow()
        self.errors = list(errors)
        self.edits: list[dict[str, Any]] = []

    async def edit_original_response(self, **fields: Any) -> object:
        self.edits.append(fields)
        if self.errors:
            raise self.errors.pop(0)
        return ("edited", len(self.edits))


class ScriptedChannel:
    """An injected channel whose `send` raises the scripted errors in turn, then posts."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.sends: list[str] = []

    def is_nsfw(self) -> bool:
        return False

    async def send(self, content: str, **fields: Any) -> object:
        self.sends.append(content)
        if self.errors:
            raise self.errors.pop(0)
        return ("sent", len(self.sends))


def scripted_output(interaction: ScriptedInteraction, channel: ScriptedChannel) -> Output:
    return Output(
        cast(Any, channel),
        channel_id=10,
        guild_id=20,
        filesize_limit=10 * 2**20,
        interaction=cast(Any, interaction),
    )


def connection_reset() -> aiohttp.ClientOSError:
    return aiohttp.ClientOSError(104, "Connection reset by peer")


async def test_output_a_progress_error_only_stops_the_progress() -> None:
    for error in (TimeoutError(), connection_reset()):
        interaction, channel = ScriptedInteraction(error), ScriptedChannel()
        output = scripted_output(interaction, channel)
        assert await output.show("step 1/3") is None  # the error is swallowed
        assert await output.show("step 2/3") is None  # and the progress edits stop: no second edit is tried
        assert len(interaction.edits) == 1
        final = await output.show("done", [("sdbot-1-0.png", b"png")], final=True)  # the result still goes out
        assert final == ("edited", 2) and channel.sends == []
        assert [f.filename for f in interaction.edits[1]["attachments"]] == ["sdbot-1-0.png"]


async def test_output_a_result_is_tried_again_then_posted_in_the_channel() -> None:
    interaction = ScriptedInteraction(TimeoutError(), connection_reset())
    channel = ScriptedChannel()
    output = scripted_output(interaction, channel)
    started = time.monotonic()
    message = await output.show("the result", [("sdbot-1-0.png", b"png")], final=True)
    assert message == ("sent", 1) and output.message == message
    assert len(interaction.edits) == 2 and channel.sends == ["the result"]  # twice where it was going, then the channel
    assert time.monotonic() - started >= output_module.RESULT_RETRY_DELAY  # a pause before the second try


async def test_output_a_result_that_never_went_out_returns_none() -> None:
    interaction = ScriptedInteraction(connection_reset(), TimeoutError())
    channel = ScriptedChannel(connection_reset(), TimeoutError())
    output = scripted_output(interaction, channel)
    assert await output.show("the result", [("sdbot-1-0.png", b"png")], final=True) is None
    assert len(interaction.edits) == 2 and len(channel.sends) == 2


async def test_a_finished_picture_is_delivered_through_connection_resets(harness: Harness) -> None:
    fake = harness.fake
    rest = fake.rest
    async with harness.running():
        # A. The first progress edit and the first upload meet a reset: tried again on the interaction.
        progress, upload = reset(ORIGINAL, 1, uploads=False), reset(ORIGINAL, 1)
        rest.faults += [progress, upload]
        first = await fake.slash_command("imagine", {"prompt": "a bridge in the rain"})
        result = await harness.result_of(first)
        row = await harness.wait_row(result_id(result) or 0, lambda r: r.status == "done")
        assert (progress.hits, upload.hits) == (1, 1)
        edits = fake.find_requests("PATCH", re.escape(first.token) + ORIGINAL.pattern)
        assert [r.status for r in edits if not is_upload(r)] == [RESET]  # the first failure stopped the progress
        assert [r.status for r in edits if is_upload(r)] == [RESET, 200]
        assert row.message_id == result.id and result.interaction_id == first.id and result.attachments

        # B. Both uploads on the interaction reset: the result is posted in the channel instead.
        progress, upload = reset(ORIGINAL, 1, uploads=False), reset(ORIGINAL, 2)
        rest.faults += [progress, upload]
        mark = fake.messages[-1].id
        second = await fake.slash_command("imagine", {"prompt": "a bridge at dawn"})
        posted = await harness.wait_channel_result(after=mark)
        row = await harness.wait_row(result_id(posted) or 0, lambda r: r.finished)
        assert (progress.hits, upload.hits) == (1, 2)
        assert row.status == "done" and row.interaction_id == second.id and row.message_id == posted.id
        assert posted.attachments and posted.attachments[0].filename == f"sdbot-{row.id}-0.png"

        # C. Every way out resets: the picture never went out, so its row is failed, not done.
        upload, channel = reset(ORIGINAL, 2), reset(CHANNEL_POST, 2, method="POST")
        rest.faults += [upload, channel]
        await fake.slash_command("imagine", {"prompt": "a bridge at night"})
        await wait_until(lambda: channel.hits == 2, "the last channel post")
        (row, *_) = await harness.rows_of(fake.alice.id)
        row = await harness.wait_row(row.id, lambda r: r.finished)
        assert upload.hits == 2
        assert row.status == "failed" and row.message_id is None and "could not be posted" in (row.reason or "")
        assert not any(result_id(m) == row.id for m in fake.messages)


# ---- 2. fetch only what Discord serves -----------------------------------------------------------------------


async def test_only_images_that_discord_serves_are_fetched(harness: Harness, other: OtherServer) -> None:
    cap = 2**20
    harness, fake = with_limits(harness, max_image_bytes=cap), harness.fake
    elsewhere = f"{other.url}/cat.png"
    async with harness.running():
        # An attachment whose URL (and proxy_url) points at another server.
        forged = FakeAttachment("cat.png", png(), elsewhere, "image/png", len(png()))
        inter = await fake.slash_command("imagine", {"prompt": "a cat"}, attachments={"image": forged})
        assert await sentence(inter) == NOT_DISCORD

        # A message whose embed shows an image from another server: the context menu, and a reply.
        shared = await fake.user_message(f"<@{fake.bot_user.id}> look", author=fake.bob)
        shared.embeds = [{"type": "rich", "image": {"url": elsewhere, "proxy_url": elsewhere}}]
        menu = await fake.context_menu("Make variations", shared, user=fake.carol)
        assert await sentence(menu) == NOT_DISCORD
        reply = await fake.user_message(f"<@{fake.bot_user.id}> a dog", author=fake.alice, reply_to=shared)
        assert await only_reply(fake, reply) == NOT_DISCORD

        # An attachment on Discord's host that redirects to another server: the redirect is not followed.
        redirected = fake.upload("moved.png", png())
        redirect = Answer(
            "GET",
            re.compile(rf"^/attachments/\d+/{redirected.id}/"),
            302,
            1,
            None,
            None,
            make=lambda: web.Response(status=302, headers={"Location": elsewhere}),
        )
        fake.rest.faults.append(redirect)
        inter = await fake.slash_command("imagine", {"prompt": "a moved cat"}, attachments={"image": redirected})
        assert await sentence(inter) == NOT_DISCORD
        assert redirect.hits == 1

        # An attachment that claims 1 KB and streams on and on: cut off once past the cap.
        streamed = [0]

        async def endless() -> AsyncIterator[bytes]:
            chunk = b"\x89PNG\r\n\x1a\n" + b"\0" * (64 * 1024 - 8)
            for _ in range(1024):  # 64 MiB, if nobody stops reading
                streamed[0] += len(chunk)
                yield chunk

        huge = fake.upload("huge.png", png(), size=1000)
        stream = Answer(
            "GET",
            re.compile(rf"^/attachments/\d+/{huge.id}/"),
            200,
            1,
            None,
            None,
            make=lambda: web.Response(body=endless(), headers={"Content-Type": "image/png"}),
        )
        fake.rest.faults.append(stream)
        inter = await fake.slash_command("imagine", {"prompt": "a long cat"}, attachments={"image": huge})
        assert await sentence(inter) == "The image is over 1.0 MiB: use a smaller one."
        assert stream.hits == 1
        assert cap < streamed[0] < 16 * cap, streamed[0]  # it stopped reading long before the 64 MiB

    assert other.requests == []  # the other server was never asked for anything
    rows = await harness.rows_of(fake.alice.id) + await harness.rows_of(fake.carol.id)
    assert len(rows) == 5 and all(r.status == "failed" and r.init_image is None for r in rows)


# ---- 3. refused requests cost nothing ------------------------------------------------------------------------


def database_bytes(db: Path) -> int:
    """The database file plus its write-ahead log."""
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def checkpointed_bytes(db: Path) -> int:
    """The database's size once its write-ahead log is copied in and emptied: what it keeps, without the log's
    frames (every commit appends its pages to the log, which is reused after each checkpoint)."""
    ((busy, _, _),) = query(db, "PRAGMA wal_checkpoint(TRUNCATE)")
    assert busy == 0
    return database_bytes(db)


async def test_refused_image_requests_cost_only_their_rows(harness: Harness) -> None:
    fake, db = harness.fake, harness.settings.storage.database
    big = image(1708, 1024, compress_level=0)  # stored, not compressed: 5 MiB
    assert len(big) >= 5 * 2**20
    async with harness.running():
        before, kept_before = database_bytes(db), checkpointed_bytes(db)
        for i in range(50):
            # Steps over this bot's limit (50): refused by the policy, before anything is downloaded.
            attachment = fake.upload(f"big-{i}.png", big)
            inter = await fake.slash_command(
                "imagine", {"prompt": f"refused {i}", "steps": 100}, attachments={"image": attachment}
            )
            assert (await sentence(inter)).startswith("Steps can be at most 50 here")
        await wait_until(lambda: query(db, "SELECT COUNT(*) FROM received") == [(0,)], "the last note dropped")
        growth = database_bytes(db) - before
        kept = checkpointed_bytes(db) - kept_before
    print(
        f"\n50 refused image-to-image requests with {len(big)}-byte attachments: the database file plus its WAL grew "
        f"by {growth} bytes, of which it keeps {kept} bytes once checkpointed"
    )
    assert kept < 2**18, kept  # 50 rows: well under 1 MiB, where 50 kept images would be 250 MiB
    assert growth < 4 * 2**20, growth  # the WAL's frames included: less than one of the attachments
    assert fake.find_requests("GET", r"^/attachments/") == []
    rows = await harness.rows_of(fake.alice.id)
    assert len(rows) == 50
    assert all(r.status == "failed" and r.init_image is None and r.strength is not None for r in rows)
    assert query(db, "SELECT COUNT(*) FROM generations WHERE init_image IS NOT NULL") == [(0,)]


# ---- 4. init-image sizes respect limits.max_side -------------------------------------------------------------


async def test_a_wide_init_image_is_drawn_within_max_side(harness: Harness) -> None:
    harness, fake = with_limits(harness, max_side=64), harness.fake
    # The tiny model's native size is 64: 8:1 at its area would be 176x16 without the limit.
    async with harness.running():
        inter = await fake.slash_command(
            "imagine", {"prompt": "a long train"}, attachments={"image": ("train.png", image(1024, 128))}
        )
        result = await harness.result_of(inter)
        row = await harness.wait_row(result_id(result) or 0, lambda r: r.status == "done")
    assert row.width is not None and row.height is not None
    assert row.width <= 64 and row.height <= 64 and row.width % 8 == 0 and row.height % 8 == 0
    assert row.width > row.height  # it keeps the shape's direction
    with Image.open(io.BytesIO(result.attachments[0].data)) as picture:
        assert picture.size == (row.width, row.height)


# ---- 5. replies to other people's images ---------------------------------------------------------------------


async def test_a_reply_to_someone_elses_image_needs_the_message_content_intent(
    harness: Harness, tmp_path: Path
) -> None:
    fake = harness.fake
    mention = f"<@{fake.bot_user.id}>"
    art = await fake.user_message("my drawing", author=fake.bob, attachments=[("art.png", png("blue"))])
    async with harness.running():
        assert not fake.message_content_intent
        hidden = await fake.user_message(f"{mention} make it green", author=fake.alice, reply_to=art)
        assert await only_reply(fake, hidden) == plain(HIDDEN)
    assert await harness.rows_of(fake.alice.id) == []
    assert fake.find_requests("GET", r"^/attachments/") == []

    settings = write_settings(tmp_path, fake, discord="message_content = true")
    async with harness.running(settings):
        assert fake.message_content_intent  # asked for, and granted
        seen = await fake.user_message(f"{mention} make it green", author=fake.alice, reply_to=art)
        variation = await harness.wait_channel_result(after=seen.id)
        row = await harness.wait_row(result_id(variation) or 0, lambda r: r.status == "done")
    assert variation.reference is seen and variation.attachments
    assert (row.kind, row.user_id, row.prompt) == ("variation", fake.alice.id, "make it green")
    assert row.init_image == art.attachments[0].data
    assert len(bot_replies_to(fake, hidden)) == 1  # still the one sentence


# ---- 6. received notes for buttons and replies ---------------------------------------------------------------


async def test_a_press_and_a_reply_cut_off_before_their_rows_are_reported_after_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    """The bot notes a Reroll press and a reply before their rows exist. The database as a crash between the two
    writes leaves it (a copy taken while they run, without their rows) makes the next start tell both users."""
    harness, unet = gated(harness)
    fake, db = harness.fake, harness.settings.storage.database
    crashed = tmp_path / "crashed.sqlite3"
    async with harness.running():
        first = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a lighthouse"}))
        gen_id = result_id(first) or 0
        await harness.wait_row(gen_id, lambda r: r.status == "done")
        await wait_until(lambda: query(db, "SELECT * FROM received") == [], "the /imagine note dropped")

        unet.entered.clear()
        unet.gate.clear()  # the next job waits inside its first step
        try:
            press = await fake.message_component(f"gen:{gen_id}:reroll", first)
            assert await asyncio.to_thread(unet.entered.wait, WAIT)
            reply = await fake.user_message("a lighthouse at dawn", author=fake.carol, reply_to=first)
            sources = (press.id, reply.id)

            # Each note is written before its row: once both rows exist, both notes must.
            rows = "SELECT COUNT(*) FROM generations WHERE source_id IN (?, ?)"
            await wait_until(lambda: query(db, rows, sources) == [(2,)], "both rows")
            notes = query(db, "SELECT interaction_id, user_id, command, prompt FROM received ORDER BY interaction_id")
            assert notes == [
                (press.id, fake.alice.id, "reroll button", ""),
                (reply.id, fake.carol.id, "reply", "a lighthouse at dawn"),
            ]
            with contextlib.closing(sqlite3.connect(db)) as live, contextlib.closing(sqlite3.connect(crashed)) as copy:
                live.backup(copy)
                with copy:  # before their rows were written
                    copy.execute("DELETE FROM generations WHERE source_id IN (?, ?)", sources)
        finally:
            unet.gate.set()  # also when an assertion fails: a job held at the gate would hold up the shutdown
        await harness.result_of(press)
        await harness.wait_channel_result(after=reply.id)
        await wait_until(lambda: query(db, "SELECT * FROM received") == [], "the notes dropped once answered")

    assert query(crashed, "SELECT COUNT(*) FROM generations WHERE status IN ('queued', 'running')") == [(0,)]
    mark = fake.messages[-1].id
    storage = dataclasses.replace(harness.settings.storage, database=crashed)
    async with harness.running(dataclasses.replace(harness.settings, storage=storage)):

        def told() -> list[str]:
            return [m.content for m in fake.messages if m.id > mark and LOST in m.content]

        await fake.wait_for(lambda: len(told()) >= 2, WAIT)
        await wait_until(lambda: query(crashed, "SELECT * FROM received") == [], "the notes dropped once told")
    assert sorted(told()) == sorted(
        [
            f"<@{fake.alice.id}>: your 🔄 Reroll {LOST}",
            f"<@{fake.carol.id}>: your reply `a lighthouse at dawn` {LOST}",
        ]
    )


async def test_received_notes_of_presses_and_replies_are_kept_until_their_row_or_their_answer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.sqlite3"

    def note(source_id: int, command: str, prompt: str = "") -> Received:
        return Received(source_id, 7, 8, 9, command, prompt, time.time())

    async with await Store.open(path) as store:
        await store.add_received(note(101, "reroll button"))
        await store.add_received(note(102, "vary button"))
        await store.add_received(note(103, "reply", "a dog"))
        await store.add_received(note(104, "reply", "a cat"))
        # 102 got its row (a vary press); 104 was answered and forgotten.
        await store.add(
            NewGeneration(
                kind="variation",
                user_id=7,
                channel_id=9,
                prompt="",
                negative="",
                scheduler="ddim",
                steps=3,
                guidance=7.5,
                model="tiny",
                source_id=102,
            )
        )
        await store.forget_received(104)
    # A crash here; at the next start:
    async with await Store.open(path) as store:
        lost = await store.lost_received()
        assert [(r.interaction_id, r.command, r.prompt) for r in lost] == [
            (101, "reroll button", ""),
            (103, "reply", "a dog"),
        ]
        for received in lost:  # its user was told
            await store.forget_received(received.interaction_id)
        assert await store.lost_received() == []


@pytest.mark.parametrize("command", ["reroll button", "vary button", "reply"])
def test_every_noted_source_has_a_name_for_its_user(command: str) -> None:
    assert command in RECEIVED_NAMES
