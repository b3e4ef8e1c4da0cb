"""Security: the token stays secret, allowlists, admin commands, blocked users, cooldowns, the cost cap, NSFW policy.

The bot runs for real against the fake Discord (tests/fakediscord) with the tiny model; SECURITY.md maps each
mitigation to the tests here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import discord
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil

import sdengine
from bot.__main__ import main
from bot.config import ConfigError, Settings, load_settings, parse_settings
from bot.replies import BLOCKED
from bot.store import Store
from sdengine import GenerationRequest, Model, SafetyChecker, generate, load_model, save_model
from tests.botharness import Harness, fake_fixture, harness_fixture, png, result_id, sentence, write_settings
from tests.fakediscord import FakeDiscord, FakeMessage, FakeRole

__all__ = ["fake_fixture", "harness_fixture"]  # fixtures used by name

TOKEN = "MTE4NzY1NDMyMTA5ODc2NTQzMg.GzYxWv.s3cr3t-t0k3n_abcdefghijklmnopqrstuvwxyz0123"
ADMIN_REFUSED = "Only server admins (Administrator or Manage Server) and the bot's owners can use /admin."
WAIT = 30.0  # seconds to wait for an answer: generous, for a loaded CI machine; a pass takes milliseconds
MANAGE_GUILD = 1 << 5
MANAGE_MESSAGES = 1 << 13


def with_changes(settings: Settings, **sections: dict[str, object]) -> Settings:
    """`settings` with some keys of some sections replaced, e.g. limits={"cooldown_seconds": 60}."""
    changed = {name: dataclasses.replace(getattr(settings, name), **keys) for name, keys in sections.items()}
    return dataclasses.replace(settings, **changed)


# ---- the token ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def root_handlers_restored() -> Iterator[None]:
    """Undo what `discord.utils.setup_logging(root=True)` does to the root logger (as `python -m bot` calls it)."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)


async def exercise_the_bot(tmp_path: Path, tiny: Model) -> tuple[FakeDiscord, list[str]]:
    """Run the bot through what logs most: results, an upload that meets a 429 and is retried, and a dropped
    gateway that resumes (RESUME carries the token). Returns the fake and the interaction tokens it issued."""
    async with FakeDiscord(token=TOKEN) as fake:
        harness = Harness(fake, write_settings(tmp_path, fake), tiny)
        async with harness.running():
            fake.fail_next("PATCH", r"/messages/@original$", 429, times=1)
            await harness.result_of(await fake.slash_command("imagine", {"prompt": "a key under a mat"}))
            await fake.drop_gateway()
            await fake.wait_for(lambda: fake.resume_count >= 1, timeout=10)
            await harness.result_of(await fake.slash_command("imagine", {"prompt": "after the resume"}))
    return fake, [inter.token for inter in fake.interactions]


async def test_the_token_never_appears_in_a_log_line_or_on_stderr(
    tmp_path: Path, tiny: Model, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="discord.http")
    with root_handlers_restored():
        # What `python -m bot --log-level DEBUG` sets up: every logger at DEBUG, written to stderr.
        discord.utils.setup_logging(level=logging.DEBUG, root=True)
        fake, interaction_tokens = await exercise_the_bot(tmp_path, tiny)
    captured = capfd.readouterr()

    records = caplog.records
    assert any(r.name == "discord.http" and r.levelno == logging.DEBUG for r in records), "DEBUG HTTP logs were off"
    assert any("RESUME" in r.getMessage() for r in records)
    assert "discord.http" in captured.err and "Logging error" not in captured.err  # stderr got the DEBUG log
    assert fake.requests[0].headers["Authorization"] == f"Bot {TOKEN}"  # the bot did use it
    formatter = logging.Formatter()
    texts = [formatter.format(record) + repr(vars(record)) for record in records]
    assert [t for t in texts if TOKEN in t] == []
    assert TOKEN not in captured.out and TOKEN not in captured.err
    # Interaction tokens are webhook credentials for 15 minutes: discord.py prints them at DEBUG only (in URLs and
    # gateway events), never at INFO or above, the level a production bot runs at.
    loud = [formatter.format(r) for r in records if r.levelno >= logging.INFO]
    assert [t for t in loud if any(token in t for token in interaction_tokens)] == []


@pytest.fixture
def fake_in_a_thread() -> Iterator[FakeDiscord]:
    """A fake Discord served from its own thread and event loop, for code that runs `asyncio.run` itself."""
    loop = asyncio.new_event_loop()
    fake = FakeDiscord(token="the-right-token")
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(fake.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield fake
    asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_a_refused_token_is_not_echoed_by_the_real_entry_point(
    tmp_path: Path,
    fake_in_a_thread: FakeDiscord,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "config.toml"
    database = (tmp_path / "db.sqlite3").as_posix()
    config.write_text(
        f'[discord]\ntoken_env = "SDBOT_TEST_TOKEN"\n[model]\npath = "tiny"\n[storage]\ndatabase = "{database}"\n'
    )
    monkeypatch.setenv("SDBOT_TEST_TOKEN", TOKEN)  # not the token this Discord knows: it answers 401
    with root_handlers_restored():
        status = main(["--config", str(config), "--log-level", "DEBUG"])
    captured = capfd.readouterr()
    assert status == 1
    assert "sdbot: Discord refused the token in SDBOT_TEST_TOKEN: check it" in captured.err
    assert "discord.http" in captured.err  # the DEBUG log was on
    assert TOKEN not in captured.out + captured.err
    assert TOKEN.split(".")[-1] not in captured.out + captured.err


@pytest.mark.parametrize(
    "text",
    [f'[discord]\ntoken_env = "{TOKEN}"', f'[discord]\ntoken = "{TOKEN}"', f'[discord]\ntoken_env = ["{TOKEN}"]'],
    ids=["token-in-token_env", "token-key", "token-in-a-list"],
)
def test_a_token_pasted_into_the_config_is_not_echoed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith("discord.token")
    assert TOKEN[:8] not in str(info.value)


# ---- allowlists ----------------------------------------------------------------------------------------------


async def test_the_guild_allowlist_refuses_every_entry_point(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running():
        result = await harness.result_of(await fake.slash_command("imagine", {"prompt": "allowed for now"}))
    rows_before = len(await harness.rows_of(fake.alice.id))

    elsewhere = with_changes(harness.settings, discord={"allowed_guild_ids": (fake.guild.id + 1,)})
    async with harness.running(elsewhere):
        refused = "I am not enabled in this server."
        assert await sentence(await fake.slash_command("imagine", {"prompt": "a cat"})) == refused
        assert await sentence(await fake.slash_command("history")) == refused
        assert await sentence(await fake.message_component(f"gen:{result_id(result)}:reroll", result)) == refused
        assert await sentence(await fake.context_menu("Make variations", result)) == refused
        # A reply gets silence: answering every mention in a server the bot is not enabled in would be spam.
        reply = await fake.user_message("again", reply_to=result)
        await fake.slash_command("imagine", {"prompt": "a marker"})  # the bot handles events in order
        await fake.wait_for(lambda: len(fake.interactions[-1].messages) > 0, WAIT)
        assert [m for m in fake.messages if m.reference is reply] == []
    assert len(await harness.rows_of(fake.alice.id)) == rows_before  # refused before they were requests


async def test_the_channel_allowlist_and_nsfw_only_channels(harness: Harness) -> None:
    fake = harness.fake
    only_nsfw = with_changes(harness.settings, discord={"nsfw_channels_only": True})
    async with harness.running(only_nsfw):
        refused = await fake.slash_command("imagine", {"prompt": "a cat"})
        assert await sentence(refused) == "I only post pictures in age-restricted channels here."
        result = await harness.result_of(
            await fake.slash_command("imagine", {"prompt": "a cat"}, channel=fake.nsfw_channel)
        )
        assert result.channel_id == fake.nsfw_channel.id

    listed = with_changes(harness.settings, discord={"allowed_channel_ids": (fake.nsfw_channel.id,)})
    async with harness.running(listed):
        outside = "I am not enabled in this channel: ask an admin where to use me."
        assert await sentence(await fake.slash_command("queue")) == outside
        upload = await fake.user_message("look", attachments=[("in.png", png())])
        assert await sentence(await fake.context_menu("Make variations", upload)) == outside
        await harness.result_of(await fake.slash_command("imagine", {"prompt": "a dog"}, channel=fake.nsfw_channel))
    rows = await harness.rows_of(fake.alice.id)
    assert [row.prompt for row in rows] == ["a dog", "a cat"]


# ---- admin commands -------------------------------------------------------------------------------------------


async def test_admin_commands_are_hidden_from_members_and_refused_when_discord_lets_them_through(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fake = harness.fake
    moderator = FakeRole("Moderator", permissions=MANAGE_MESSAGES)
    manager = FakeRole("Server manager", permissions=MANAGE_GUILD)
    fake.guild.roles += [moderator, manager]
    for user, role in ((fake.bob, moderator), (fake.carol, manager)):
        member = fake.guild.member(user)
        assert member is not None
        member.roles.append(role)
    attempts: list[tuple[str, dict[str, object]]] = [
        ("admin pause", {}),
        ("admin resume", {}),
        ("admin cancel", {"id": 1}),
        ("admin purge", {"user": fake.alice}),
        ("admin block", {"user": fake.alice}),
        ("admin unblock", {"user": fake.alice}),
        ("admin blocked", {}),
    ]
    async with harness.running() as bot:
        (admin,) = [c for cmds in fake.commands.values() for c in cmds if c["name"] == "admin"]
        assert int(admin["default_member_permissions"]) == 8  # Administrator
        with pytest.raises(PermissionError):  # Discord itself hides it from members
            await fake.slash_command("admin pause", user=fake.alice)

        # A server admin can grant the command to everyone in Server Settings > Integrations: the bot still refuses.
        for user in (fake.alice, fake.bob):
            for name, options in attempts:
                inter = await fake.slash_command(name, options, user=user, check_permissions=False)
                assert await sentence(inter) == ADMIN_REFUSED, (user.username, name)
        assert not bot.executor.stats().paused
        assert not bot.store.is_blocked(fake.alice.id)
        assert await bot.store.admin_actions() == []
        refusals = [r for r in caplog.records if r.getMessage().startswith("refused /admin")]
        assert len(refusals) == 2 * len(attempts)

        # Manage Server is enough, when Discord lets it through.
        paused = await fake.slash_command("admin pause", user=fake.carol, check_permissions=False)
        assert (await paused.wait_message(lambda m: not m.loading, WAIT)).content.startswith("Paused")
        assert bot.executor.stats().paused

    # The owners in the config need no permission at all.
    owners = with_changes(harness.settings, discord={"owner_ids": (fake.alice.id,)})
    async with harness.running(owners) as bot:
        inter = await fake.slash_command("admin resume", user=fake.alice, check_permissions=False)
        assert (await inter.wait_message(lambda m: not m.loading, WAIT)).content == "Resumed: queued jobs start again."
        actions = await bot.store.admin_actions()
        assert [(a.actor_id, a.action) for a in actions] == [(fake.alice.id, "resume"), (fake.carol.id, "pause")]
        refused = await fake.slash_command("admin block", {"user": fake.alice}, user=fake.admin)
        assert "is one of the bot's owners and cannot be blocked" in await sentence(refused)


async def admin(fake: FakeDiscord, name: str, options: dict[str, object] | None = None) -> str:
    """Run an /admin command as the server admin and return its ephemeral answer."""
    inter = await fake.slash_command(f"admin {name}", options or {}, user=fake.admin)
    message = await inter.wait_message(lambda m: m.ephemeral and not m.loading and not m.deleted, timeout=WAIT)
    return message.content


async def test_admins_pause_cancel_purge_and_block_and_a_block_survives_a_restart(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fake = harness.fake
    alice, bob = fake.alice, fake.bob
    async with harness.running() as bot:
        result = await harness.result_of(await fake.slash_command("imagine", {"prompt": "before the block"}))
        gen_id = result_id(result)

        assert await admin(fake, "pause") == "Paused: running jobs finish, and queued ones wait for /admin resume."
        first, second = [await fake.slash_command("imagine", {"prompt": f"wait {i}"}) for i in (1, 2)]
        bobs = await fake.slash_command("imagine", {"prompt": "bob waits"}, user=bob)
        for inter in (first, second, bobs):
            await inter.wait_message(lambda m: "queued" in m.content, WAIT)
        ids = {row.prompt: row.id for row in [*await harness.rows_of(alice.id), *await harness.rows_of(bob.id)]}

        assert await admin(fake, "cancel", {"id": ids["wait 1"]}) == f"Cancelling #{ids['wait 1']}."
        assert (await harness.wait_row(ids["wait 1"], lambda r: r.finished)).status == "cancelled"
        purged = await admin(fake, "purge", {"user": alice})
        assert purged == f"Cancelling #{ids['wait 2']} of alice ({alice.id})."
        assert (await harness.wait_row(ids["wait 2"], lambda r: r.finished)).status == "cancelled"
        assert await admin(fake, "cancel", {"id": ids["wait 1"]}) == f"#{ids['wait 1']} is not queued or running."

        blocked = await admin(fake, "block", {"user": bob, "reason": "spam"})
        assert blocked == f"Blocked bob ({bob.id}) and cancelling 1 of their jobs."
        assert (await harness.wait_row(ids["bob waits"], lambda r: r.finished)).status == "cancelled"
        assert await admin(fake, "resume") == "Resumed: queued jobs start again."
        assert "1 blocked" in await admin(fake, "blocked") and str(bob.id) in await admin(fake, "blocked")
        bob_rows = len(await harness.rows_of(bob.id))

        await assert_blocked_everywhere(fake, result, gen_id)
        assert len(await harness.rows_of(bob.id)) == bob_rows  # refused before they were requests

        actions = [(a.actor_id, a.action, a.target) for a in await bot.store.admin_actions()][::-1]
        assert actions == [
            (fake.admin.id, "pause", None),
            (fake.admin.id, "cancel", ids["wait 1"]),
            (fake.admin.id, "purge", alice.id),
            (fake.admin.id, "block", bob.id),
            (fake.admin.id, "resume", None),
        ]
        assert any(f"admin action by user {fake.admin.id}" in r.getMessage() for r in caplog.records)

    async with harness.running():  # a new process: the block is in SQLite
        await assert_blocked_everywhere(fake, result, gen_id)
        assert await admin(fake, "unblock", {"user": bob}) == f"Unblocked bob ({bob.id})."
        await harness.result_of(await fake.slash_command("imagine", {"prompt": "welcome back"}, user=bob))
        assert await admin(fake, "unblock", {"user": bob}) == f"bob ({bob.id}) is not blocked."


async def assert_blocked_everywhere(fake: FakeDiscord, result: FakeMessage, gen_id: int | None) -> None:
    """Bob is blocked: every entry point answers with the one sentence."""
    bob = fake.bob
    entry_points = [
        await fake.slash_command("imagine", {"prompt": "let me in"}, user=bob),
        await fake.slash_command("reroll", {"id": gen_id or 0}, user=bob),
        await fake.slash_command("history", user=bob),
        await fake.slash_command("queue", user=bob),
        await fake.slash_command("cancel", user=bob),
        await fake.message_component(f"gen:{gen_id}:reroll", result, user=bob),
        await fake.message_component(f"gen:{gen_id}:vary:0", result, user=bob),
        await fake.message_component(f"gen:{gen_id}:delete", result, user=bob),
        await fake.context_menu("Make variations", result, user=bob),
    ]
    for inter in entry_points:
        assert await sentence(inter) == BLOCKED, inter.payload["data"]
    reply = await fake.user_message("let me in", author=bob, reply_to=result)
    answer = await fake.wait_for(lambda: next((m for m in fake.messages if m.reference is reply), None), WAIT)
    assert answer.content == BLOCKED and answer.mentions == [] and not answer.attachments


# ---- cooldown and cost --------------------------------------------------------------------------------------


async def test_the_cooldown_refuses_before_downloading(harness: Harness) -> None:
    fake = harness.fake
    settings = with_changes(harness.settings, limits={"cooldown_seconds": 60.0})
    async with harness.running(settings):
        result = await harness.result_of(await fake.slash_command("imagine", {"prompt": "first"}))
        attachment = fake.upload("big.png", png(size=512))
        again = await fake.slash_command("imagine", {"prompt": "second"}, attachments={"image": attachment})
        refusal = re.fullmatch(r"You are on cooldown: try again in (\d+) s\.", await sentence(again))
        assert refusal is not None and 0 < int(refusal[1]) <= 60
        assert fake.find_requests("GET", f"/attachments/.*/{attachment.id}/") == []
        button = await fake.message_component(f"gen:{result_id(result)}:reroll", result)
        assert (await sentence(button)).startswith("You are on cooldown")
        # Other users have their own cooldown.
        await harness.result_of(await fake.slash_command("imagine", {"prompt": "bob's turn"}, user=fake.bob))
    rows = await harness.rows_of(fake.alice.id)
    assert [(r.prompt, r.status) for r in rows] == [("first", "failed"), ("second", "failed"), ("first", "done")]
    assert all(r.reason is not None and r.reason.startswith("You are on cooldown") for r in rows[:2])


async def test_the_cost_cap(harness: Harness) -> None:
    fake = harness.fake
    # tiny draws 64x64; the default 3 steps for one image is exactly the cap.
    settings = with_changes(harness.settings, limits={"max_cost": 64 * 64 * 3})
    async with harness.running(settings):
        too_much = await fake.slash_command("imagine", {"prompt": "two", "count": 2})
        assert await sentence(too_much) == (
            "2 images of 64x64 at 3 steps is more work than allowed here: lower the steps, the size or the count."
        )
        steps = await fake.slash_command("imagine", {"prompt": "four steps", "steps": 4})
        assert (await sentence(steps)).startswith("1 image of 64x64 at 4 steps is more work")
        await harness.result_of(await fake.slash_command("imagine", {"prompt": "one"}))
    rows = await harness.rows_of(fake.alice.id)
    assert [(r.prompt, r.status) for r in rows] == [("one", "done"), ("four steps", "failed"), ("two", "failed")]


# ---- NSFW policy ----------------------------------------------------------------------------------------------


def tiny_safety_checker(*, flag_everything: bool) -> SafetyChecker:
    """A random-weight StableDiffusionSafetyChecker on tiny CLIP configs. Its concept thresholds are 1 by default,
    which a cosine can never exceed (nothing flagged); -1 flags every image."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    model = StableDiffusionSafetyChecker(config).eval()
    if flag_everything:
        with torch.no_grad():
            model.concept_embeds_weights.fill_(-1.0)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return SafetyChecker(model, processor)


@pytest.fixture(scope="module")
def checked_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as a folder with a safety checker that flags every image."""
    model = load_model("tiny")
    model.safety_checker = tiny_safety_checker(flag_everything=True)
    return save_model(model, tmp_path_factory.mktemp("checked") / "model")


@pytest.fixture(scope="module")
def checked(checked_folder: Path) -> Model:
    return load_model(str(checked_folder))


def test_the_engine_loads_the_folders_safety_checker_and_only_flags(checked: Model, checked_folder: Path) -> None:
    assert checked.safety_checker is not None
    assert load_model(str(checked_folder), safety_checker=False).safety_checker is None
    request = GenerationRequest("a test pattern", steps=2, seed=3, count=2)
    flagged = generate(checked, request)
    assert flagged.nsfw == [True, True]
    unchecked = generate(checked, dataclasses.replace(request, safety_check=False))
    assert unchecked.nsfw == [False, False]
    # The checker only reports: the pixels are the same either way.
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(flagged.images, unchecked.images, strict=True)
    )
    checker = tiny_safety_checker(flag_everything=False)
    assert checker.check(flagged.images) == [False, False]


@pytest.fixture
def checked_harness(harness: Harness, checked: Model) -> Harness:
    return dataclasses.replace(harness, model=checked)


def black(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return not np.asarray(image.convert("RGB")).any()


async def test_flagged_images_are_blacked_out_outside_age_restricted_channels(checked_harness: Harness) -> None:
    harness, fake = checked_harness, checked_harness.fake
    async with harness.running():
        inter = await fake.slash_command("imagine", {"prompt": "a flagged thing", "count": 2, "steps": 40})
        result = await harness.result_of(inter)
        gen_id = result_id(result)
        assert all(black(a.data) for a in result.attachments)  # the grid and both images
        note = "Images 1, 2 of 2 were flagged as NSFW by the safety checker and blacked out"
        assert note in result.content
        row = await harness.wait_row(gen_id or 0, lambda r: r.finished)
        assert row.status == "done" and any(n.startswith(note) for n in row.notices)
        # No latent preview either: it could show what the checker blacks out.
        assert [f for r in fake.requests for f in r.files if f.filename == f"preview-{gen_id}.png"] == []

        # An age-restricted channel gets the picture as drawn, with its previews.
        inter = await fake.slash_command("imagine", {"prompt": "the same", "steps": 40}, channel=fake.nsfw_channel)
        await inter.wait_message(lambda m: any(a.filename.startswith("preview-") for a in m.attachments), WAIT)
        nsfw = await harness.result_of(inter)
        assert not black(nsfw.attachments[0].data) and "safety checker" not in nsfw.content

    off = with_changes(harness.settings, safety={"checker": "off"})
    async with harness.running(off):
        unchecked = await harness.result_of(await fake.slash_command("imagine", {"prompt": "unchecked"}))
        assert not black(unchecked.attachments[0].data) and "safety checker" not in unchecked.content


async def test_checker_on_refuses_to_start_without_one(harness: Harness) -> None:
    on = with_changes(harness.settings, safety={"checker": "on"})
    with pytest.raises(sdengine.ModelLoadError, match=r'safety.checker is "on" but the model .tiny. has no'):
        async with harness.running(on):
            pass


def test_the_safety_setting() -> None:
    assert Settings().safety.checker == "auto"
    assert parse_settings({"safety": {"checker": "on"}}).safety.checker == "on"
    for bad in ("yes", True, 1):
        with pytest.raises(ConfigError) as info:
            parse_settings({"safety": {"checker": bad}})
        assert str(info.value).startswith("safety.checker: must be one of auto, on, off, not ")
    with pytest.raises(ConfigError, match=r"safety\.blur: unknown key"):
        parse_settings({"safety": {"blur": True}})


async def test_blocks_live_in_sqlite(tmp_path: Path) -> None:
    """Blocks live in SQLite (migration 2), so they survive a restart and are shared by every connection."""
    path = tmp_path / "db.sqlite3"
    async with await Store.open(path) as store:
        assert await store.block(42, by=1, reason="spam") and not await store.block(42, by=2)
        assert await store.get(2**64) is None  # a forged id is no row, not an OverflowError
    async with await Store.open(path) as store:
        (blocked,) = await store.blocked_users()
        assert (blocked.user_id, blocked.blocked_by, blocked.reason) == (42, 1, "spam")
        assert store.is_blocked(42) and not store.is_blocked(43)  # read into memory at open
        assert await store.unblock(42) and not store.is_blocked(42) and not await store.unblock(42)
