"""The bot end to end: the real discord.py client against the fake Discord over sockets, the tiny model, SQLite.

Every test starts the bot with `harness.running()`; the fixtures fail a test that logged an error or leaked a task.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

import sdengine
from bot.__main__ import main
from bot.cogs.results import NOT_YOURS
from bot.rows import NewGeneration
from tests.botharness import (
    Harness,
    custom_ids,
    fake_fixture,
    harness_fixture,
    pixels,
    png,
    result_id,
    write_settings,
)
from tests.fakediscord import FakeMessage

__all__ = ["fake_fixture", "harness_fixture"]  # fixtures used by name


def parameters(data: bytes) -> dict[str, str]:
    """The fields of a PNG's A1111 parameters, plus its prompt under "prompt"."""
    text = sdengine.read_parameters(data)
    assert text is not None
    prompt, *rest = text.split("\n")
    fields = dict(re.findall(r"([A-Za-z ]+): ([^,]+)", rest[-1]))
    return {"prompt": prompt, **{k.strip(): v.strip() for k, v in fields.items()}}


def only_ephemeral_sentence(inter_messages: list[FakeMessage]) -> str:
    """The one visible message an interaction left: ephemeral, plain (no files, no buttons)."""
    visible = [m for m in inter_messages if not m.deleted]
    assert len(visible) == 1, [(m.content, m.deleted) for m in inter_messages]
    (message,) = visible
    assert message.ephemeral and not message.attachments and not message.components
    return message.content


async def test_imagine_defers_at_once_and_posts_a_png_with_its_parameters(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    fake = harness.fake
    caplog.set_level(logging.DEBUG)  # even discord.py's debug logs must not show the token
    async with harness.running():
        options = {"prompt": "a red fox", "seed": 1234, "steps": 4, "scheduler": "ddim", "size": "portrait"}
        inter = await fake.slash_command("imagine", options)
        callback = await inter.wait_callback()
        assert callback.type == 5 and not callback.ephemeral and callback.latency < 3

        result = await harness.result_of(inter)
        gen_id = result_id(result)
        assert gen_id is not None
        (attachment,) = result.attachments
        assert attachment.filename == f"sdbot-{gen_id}-0.png"
        params = parameters(attachment.data)
        assert params["prompt"] == "a red fox" and params["Seed"] == "1234" and params["Steps"] == "4"
        assert params["Sampler"] == "DDIM" and params["Size"] == "64x96"  # tiny: native 64, sides in 16s
        assert f"#{gen_id}" in result.content and "seed 1234" in result.content
        assert custom_ids(result) == [
            f"gen:{gen_id}:{action}" for action in ("vary:0", "upscale:0", "reroll", "delete")
        ]
        assert result.edits >= 2  # progress, then the result in the same message

        row = await harness.wait_row(gen_id, lambda r: r.status == "done")
        assert (row.prompt, row.seed, row.seeds, row.steps, row.kind) == ("a red fox", 1234, [1234], 4, "imagine")
        assert row.user_id == fake.alice.id and row.interaction_id == inter.id and row.message_id == result.id
    assert fake.token not in caplog.text


async def test_an_attached_image_gives_image_to_image_and_reroll_reuses_it(harness: Harness) -> None:
    fake = harness.fake
    init = png("blue")
    async with harness.running():
        inter = await fake.slash_command(
            "imagine", {"prompt": "a blue fox", "seed": 7, "strength": 0.5}, attachments={"image": ("in.png", init)}
        )
        result = await harness.result_of(inter)
        gen_id = result_id(result)
        assert gen_id is not None
        params = parameters(result.attachments[0].data)
        assert params["prompt"] == "a blue fox" and params["Denoising strength"] == "0.5"
        row = await harness.wait_row(gen_id, lambda r: r.status == "done")
        assert row.init_image == init and row.strength == 0.5

        # The stored init image makes a reroll of an image-to-image result exact too.
        again = await harness.result_of(await fake.slash_command("reroll", {"id": gen_id}))
        assert np.array_equal(pixels(again.attachments[0].data), pixels(result.attachments[0].data))


async def test_replying_to_a_result_or_the_context_menu_makes_variations(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running():
        result = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a castle", "seed": 3}))
        gen_id = result_id(result)

        # Replying to the bot mentions it, so the reply's text is visible without the message content intent.
        reply = await fake.user_message("a castle at night", author=fake.bob, reply_to=result)
        variation = await harness.wait_channel_result(after=reply.id)
        assert variation.reference is reply and variation.mentions == []
        row = await harness.wait_row(result_id(variation) or 0, lambda r: r.status == "done")
        assert (row.kind, row.parent_id, row.user_id, row.prompt) == (
            "variation",
            gen_id,
            fake.bob.id,
            "a castle at night",
        )
        assert row.init_image == result.attachments[0].data
        assert "Denoising strength" in parameters(variation.attachments[0].data)

        # No text: the prompt stored for that result.
        bare = await fake.user_message("", author=fake.carol, reply_to=result)
        again = await harness.wait_channel_result(after=bare.id)
        assert parameters(again.attachments[0].data)["prompt"] == "a castle"

        # The context menu on someone's upload of a result: the prompt comes from the PNG's parameters.
        upload = await fake.user_message("look", author=fake.bob, attachments=[("art.png", result.attachments[0].data)])
        menu = await fake.context_menu("Make variations", upload, user=fake.carol)
        assert (await menu.wait_callback()).type == 5
        from_menu = await harness.result_of(menu)
        assert parameters(from_menu.attachments[0].data)["prompt"] == "a castle"

        # A message without an image gets one ephemeral sentence.
        text_only = await fake.user_message("just words", author=fake.bob)
        empty = await fake.context_menu("Make variations", text_only, user=fake.carol)
        await empty.wait_message(lambda m: m.ephemeral)
        assert only_ephemeral_sentence(empty.messages) == "That message has no image to make variations of."


async def test_buttons_work_after_a_restart(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running():
        result = await harness.result_of(
            await fake.slash_command("imagine", {"prompt": "a lighthouse", "seed": 11, "count": 2})
        )
    gen_id = result_id(result)
    # A grid first, then each image on its own, carrying its parameters; Vary per image.
    assert [a.filename for a in result.attachments] == [
        f"sdbot-{gen_id}-grid.png",
        f"sdbot-{gen_id}-0.png",
        f"sdbot-{gen_id}-1.png",
    ]
    assert (result.attachments[0].width, result.attachments[0].height) == (128, 64)
    assert parameters(result.attachments[2].data)["Seed"] == "12"
    assert custom_ids(result)[:2] == [f"gen:{gen_id}:vary:0", f"gen:{gen_id}:vary:1"]

    async with harness.running():  # a new bot process on the same database
        press = await fake.message_component(f"gen:{gen_id}:reroll", result, user=fake.bob)
        assert (await press.wait_callback()).type == 5
        rerolled = await harness.result_of(press)
        row = await harness.wait_row(result_id(rerolled) or 0, lambda r: r.status == "done")
        assert (row.kind, row.parent_id, row.user_id, row.prompt, row.count) == (
            "reroll",
            gen_id,
            fake.bob.id,
            "a lighthouse",
            2,
        )

        vary = await fake.message_component(f"gen:{gen_id}:vary:1", result, user=fake.carol)
        varied = await harness.result_of(vary)
        row = await harness.wait_row(result_id(varied) or 0, lambda r: r.status == "done")
        assert row.kind == "variation" and row.init_image == result.attachments[2].data

        # Delete: only the requester or a moderator. The press is acknowledged first, then refused.
        refused = await fake.message_component(f"gen:{gen_id}:delete", result, user=fake.bob)
        assert (await refused.wait_callback()).type == 6
        await refused.wait_message(lambda m: m.ephemeral)
        assert [m.content for m in refused.messages if m.ephemeral] == [NOT_YOURS.format(what="delete")]
        assert not result.deleted
        await fake.message_component(f"gen:{gen_id}:delete", result, user=fake.admin)
        await fake.wait_for(lambda: result.deleted)


async def test_reroll_with_the_stored_seed_gives_identical_pixels(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running():
        first = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a tree"}))
        gen_id = result_id(first)
        seed = parameters(first.attachments[0].data)["Seed"]

        again = await harness.result_of(await fake.slash_command("reroll", {"id": gen_id}))
        assert parameters(again.attachments[0].data)["Seed"] == seed
        assert np.array_equal(pixels(again.attachments[0].data), pixels(first.attachments[0].data))
        assert "Exact reproduction" in again.content

        other = await harness.result_of(await fake.slash_command("reroll", {"id": gen_id, "seed": 99}))
        assert parameters(other.attachments[0].data)["Seed"] == "99"

        # Vary on a result whose image is no longer attached redraws it from the stored seed.
        image = first.attachments[0].data
        first.attachments = []
        varied = await harness.result_of(await fake.message_component(f"gen:{gen_id}:vary:0", first))
        row = await harness.wait_row(result_id(varied) or 0, lambda r: r.status == "done")
        assert row.init_image == image and row.parent_id == gen_id

        # Someone else may rerun it where it was posted, and nowhere else.
        theirs = await harness.result_of(await fake.slash_command("reroll", {"id": gen_id}, user=fake.bob))
        assert np.array_equal(pixels(theirs.attachments[0].data), pixels(image))
        refused = await fake.slash_command("reroll", {"id": gen_id}, user=fake.bob, channel=fake.nsfw_channel)
        await refused.wait_message(lambda m: m.ephemeral)
        assert only_ephemeral_sentence(refused.messages).startswith(f"You have no generation #{gen_id} here:")


async def test_history_lists_the_users_generations_in_pages(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running() as bot:
        result = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a *bold* moon", "seed": 5}))
        gen_id = result_id(result)
        for i in range(10):  # older rows, written straight to the store
            await bot.store.add(
                NewGeneration(
                    kind="imagine",
                    user_id=fake.alice.id,
                    channel_id=fake.channel.id,
                    prompt=f"old prompt {i}",
                    negative="",
                    scheduler="ddim",
                    steps=3,
                    guidance=7.5,
                    model="tiny",
                    seed=i,
                )
            )
        await harness.wait_row(gen_id or 0, lambda r: r.status == "done")

        inter = await fake.slash_command("history")
        assert (await inter.wait_callback()).ephemeral
        page = await inter.wait_message(lambda m: "page 1 of 2" in m.content)
        assert page.ephemeral and "11 in all" in page.content and "old prompt 9" in page.content
        assert f"`#{gen_id}`" not in page.content  # the newest ten come first

        older = custom_ids(page)[1]  # [Newer, Older]
        refused = await fake.message_component(older, page, user=fake.bob)
        await refused.wait_callback()
        assert refused.callbacks[0].ephemeral
        await fake.message_component(older, page)
        await fake.wait_for(lambda: "page 2 of 2" in page.content)
        assert f"`#{gen_id}` a \\*bold\\* moon · seed 5 · <t:" in page.content


async def test_cancel_a_queued_job_with_its_button_and_a_running_one_with_slash_cancel(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running() as bot:
        bot.executor.pause(True)
        inter = await fake.slash_command("imagine", {"prompt": "a slow river"})
        progress = await inter.wait_message(lambda m: any(c.endswith(":cancel") for c in custom_ids(m)))
        assert "queued: position 1 of 1" in progress.content
        cancel_id = custom_ids(progress)[0]
        gen_id = int(cancel_id.split(":")[1])
        queue = await fake.slash_command("queue")
        status = await queue.wait_message()
        assert status.ephemeral and status.content.startswith("1 waiting, 0 running")
        assert f"Yours: #{gen_id} at position 1." in status.content

        refused = await fake.message_component(cancel_id, progress, user=fake.bob)
        await refused.wait_message(lambda m: m.ephemeral)
        assert [m.content for m in refused.messages if m.ephemeral] == [NOT_YOURS.format(what="cancel")]
        press = await fake.message_component(cancel_id, progress)
        assert (await press.wait_callback()).type == 6
        await fake.wait_for(lambda: "cancelled" in progress.content and not progress.components)
        assert (await harness.wait_row(gen_id, lambda r: r.status != "queued")).status == "cancelled"
        bot.executor.pause(False)

        slow = await fake.slash_command("imagine", {"prompt": "a slower river", "steps": 50})
        gen_id += 1
        preview = [f"preview-{gen_id}.png"]  # a small picture of the latents, with the step count
        running = await slow.wait_message(
            lambda m: "step " in m.content and [a.filename for a in m.attachments] == preview
        )
        cancel = await fake.slash_command("cancel")
        answer = await cancel.wait_message()
        assert answer.ephemeral and answer.content == f"Cancelling #{gen_id}."
        await fake.wait_for(lambda: "cancelled" in running.content)
        row = await harness.wait_row(gen_id, lambda r: r.finished)
        assert row.status == "cancelled" and row.started_at is not None


async def test_shutdown_tells_the_waiting_users_and_marks_their_rows(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running() as bot:
        bot.executor.pause(True)
        inter = await fake.slash_command("imagine", {"prompt": "a last wish"})
        progress = await inter.wait_message(lambda m: "queued" in m.content)
    assert "The bot shut down before this request finished" in progress.content and not progress.components
    (row,) = await harness.rows_of(fake.alice.id)
    assert row.status == "failed" and row.reason is not None and "shut down" in row.reason


async def test_mentions_in_a_prompt_ping_nobody(harness: Harness) -> None:
    fake = harness.fake
    role = fake.guild.roles[-1]
    prompt = f"@everyone @here <@&{role.id}> <@{fake.bob.id}> a crowd"
    async with harness.running():
        result = await harness.result_of(await fake.slash_command("imagine", {"prompt": prompt}))
        reply = await fake.user_message(f"<@{fake.bot_user.id}> {prompt}", author=fake.bob, reply_to=result)
        await harness.wait_channel_result(after=reply.id)

    assert "@\u200beveryone @\u200bhere" in result.content
    assert f"<@\u200b&{role.id}> <@\u200b{fake.bob.id}>" in result.content
    bot_messages = [m for m in fake.messages if m.author is fake.bot_user]
    assert len(bot_messages) >= 2 and all(m.mentions == [] for m in bot_messages)
    # Every message the bot sent or edited said so explicitly.
    bodies = [r.json.get("data", r.json) if "/callback" in r.path else r.json for r in fake.requests if r.json]
    with_content = [b for b in bodies if isinstance(b, dict) and b.get("content")]
    assert with_content and all(b["allowed_mentions"]["parse"] == [] for b in with_content)
    assert all(not b["allowed_mentions"].get("replied_user") for b in with_content)


@pytest.mark.parametrize(
    ("options", "attachment", "sentence"),
    [
        ({"steps": 60}, None, "Steps can be at most 50 here, not 60."),
        ({}, ("notes.txt", b"hello", "text/plain"), "That file is not an image: attach a PNG, JPEG, WebP or GIF."),
        ({}, ("fake.png", b"not a png at all", "image/png"), "This file is not a PNG, JPEG, WebP or GIF image"),
        ({"prompt": "   "}, None, "The prompt is empty: describe the picture you want."),
    ],
    ids=["too-many-steps", "not-an-image", "lying-image", "blank-prompt"],
)
async def test_bad_input_gets_one_ephemeral_sentence_and_a_failed_row(
    harness: Harness, options: dict[str, object], attachment: tuple[str, bytes, str] | None, sentence: str
) -> None:
    fake = harness.fake
    async with harness.running():
        inter = await fake.slash_command(
            "imagine",
            {"prompt": "a cat", **options},
            attachments={"image": attachment} if attachment else None,
        )
        assert (await inter.wait_callback()).type == 5
        await inter.wait_message(lambda m: m.ephemeral)
        assert only_ephemeral_sentence(inter.messages).startswith(sentence)
        (row,) = await harness.rows_of(fake.alice.id)
        assert row.status == "failed" and row.reason is not None and row.reason.startswith(sentence)


async def test_an_expired_interaction_token_posts_the_result_in_the_channel(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running() as bot:
        bot.executor.pause(True)
        inter = await fake.slash_command("imagine", {"prompt": "a late train"})
        await inter.wait_message(lambda m: "queued" in m.content)
        fake.expire_token(inter.token)
        bot.executor.pause(False)
        result = await harness.wait_channel_result()
        gen_id = result_id(result)
        row = await harness.wait_row(gen_id or 0, lambda r: r.status == "done")
        assert row.message_id == result.id and result.attachments


async def test_failing_edits_do_not_stop_the_result(harness: Harness) -> None:
    fake = harness.fake
    fake.fail_next("PATCH", r"/messages/@original$", 404, times=1000)  # the progress message was deleted
    async with harness.running():
        inter = await fake.slash_command("imagine", {"prompt": "a ghost"})
        result = await harness.wait_channel_result()
        row = await harness.wait_row(result_id(result) or 0, lambda r: r.status == "done")
        assert row.message_id == result.id and row.interaction_id == inter.id


async def test_the_channel_allowlist(harness: Harness, tmp_path: Path) -> None:
    fake = harness.fake
    settings = write_settings(tmp_path, fake, discord=f"allowed_channel_ids = [{fake.nsfw_channel.id}]")
    async with harness.running(settings):
        refused = await fake.slash_command("imagine", {"prompt": "a cat"})
        await refused.wait_message(lambda m: m.ephemeral)
        assert only_ephemeral_sentence(refused.messages).startswith("I am not enabled in this channel")
        assert await harness.rows_of(fake.alice.id) == []  # refused before it was a request


def test_a_bad_config_stops_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    config = tmp_path / "config.toml"
    config.write_text('[discord]\ntoken_env = "SDBOT_TEST_NO_SUCH_TOKEN"\n')
    assert main(["--config", str(config)]) == 2
    assert capsys.readouterr().err == "sdbot: SDBOT_TEST_NO_SUCH_TOKEN is not set: export your bot token in it\n"
