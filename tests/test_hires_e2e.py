"""The hires fix through the bot: `/imagine hires`, the Upscale buttons, their rows, and `/reroll` of both pixel for
pixel; a hires request over the limits gets one sentence and keeps its row."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

import sdengine
from bot.config import load_settings
from bot.policy import Policy
from sdengine import GenerationRequest, Model
from tests.botharness import custom_ids, fake_fixture, pixels, result_id, sentence
from tests.fakediscord import FakeDiscord
from tests.test_models_e2e import models_config, result_of, running

__all__ = ["fake_fixture"]  # used by name

CONFIG = '[model]\npath = "tiny"'


def _infotext(data: bytes) -> str:
    return data.decode("latin-1")


async def test_imagine_with_hires_and_its_reroll(fake: FakeDiscord, tmp_path: Path, tiny: Model) -> None:
    async with running(fake, models_config(tmp_path, fake, CONFIG, max_loaded=0)) as bot:
        options = {"prompt": "a tree", "seed": 9, "hires": 2.0, "hires_steps": 4, "hires_upscaler": "lanczos"}
        first = await result_of(await fake.slash_command("imagine", options))
        gen_id = result_id(first) or 0
        image = first.attachments[0].data
        assert pixels(image).shape == (128, 128, 3)
        infotext = _infotext(image)
        for field in ("Size: 64x64", "Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 4", "Lanczos"):
            assert field in infotext
        assert "Hires fix 2x from 64x64 (Lanczos)." in first.content
        assert not any(":upscale:" in c for c in custom_ids(first))  # upscaled already

        row = await bot.store.get(gen_id)
        assert row is not None
        assert (row.width, row.height, row.hires_scale, row.hires_steps, row.hires_upscaler) == (
            64,
            64,
            2.0,
            4,
            "lanczos",
        )
        request = GenerationRequest(
            "a tree", steps=2, seed=9, hires_scale=2, hires_steps=4, hires_upscaler="lanczos", model="tiny"
        )
        assert np.array_equal(pixels(image), np.asarray(sdengine.generate(tiny, request).images[0]))

        again = await result_of(await fake.slash_command("reroll", {"id": gen_id}))
        assert "Exact reproduction" in again.content
        assert np.array_equal(pixels(again.attachments[0].data), pixels(image))


async def test_upscale_2_of_a_four_image_result_and_its_reroll(fake: FakeDiscord, tmp_path: Path, tiny: Model) -> None:
    models_config(tmp_path, fake, CONFIG, max_loaded=0)
    path = tmp_path / "config.toml"
    path.write_text(path.read_text().replace("[defaults]\n", "[defaults]\nupscale = 1.5\n"))
    async with running(fake, load_settings(path)) as bot:
        four = await result_of(await fake.slash_command("imagine", {"prompt": "a boat", "seed": 40, "count": 4}))
        gen_id = result_id(four) or 0
        assert [c for c in custom_ids(four) if ":upscale:" in c] == [f"gen:{gen_id}:upscale:{i}" for i in range(4)]

        press = await fake.message_component(f"gen:{gen_id}:upscale:1", four)
        assert (await press.wait_callback()).type == 5  # thinking: a new message comes
        upscaled = await result_of(press)
        up_id = result_id(upscaled) or 0
        assert up_id != gen_id and f"Image 2 of #{gen_id}, upscaled 1.5x." in upscaled.content  # [defaults] upscale
        data = upscaled.attachments[0].data
        assert pixels(data).shape == (96, 96, 3) and "Seed: 41" in _infotext(data)
        assert f"gen:{up_id}:reroll" in custom_ids(upscaled) and f"gen:{up_id}:vary:0" in custom_ids(upscaled)

        row = await bot.store.get(up_id)
        assert row is not None and (row.kind, row.parent_id, row.count, row.seed) == ("reroll", gen_id, 1, 41)
        assert (row.hires_scale, row.hires_strength, row.hires_upscaler) == (1.5, 0.5, "latent")
        # Image 2 of the four, alone and upscaled: what the engine draws for its seed
        alone = GenerationRequest("a boat", steps=2, seed=41, hires_scale=1.5, model="tiny")
        assert np.array_equal(pixels(data), np.asarray(sdengine.generate(tiny, alone).images[0]))
        # ... whose first pass is image 2 itself
        first_pass = sdengine.generate(tiny, replace(alone, hires_scale=None)).images[0]
        second = next(a for a in four.attachments if a.filename == f"sdbot-{gen_id}-1.png")
        assert np.abs(np.asarray(first_pass, np.int16) - pixels(second.data)).max() <= 1

        again = await result_of(await fake.slash_command("reroll", {"id": up_id}))
        assert np.array_equal(pixels(again.attachments[0].data), pixels(data))


async def test_hires_over_the_limits_gets_one_sentence_and_keeps_its_row(fake: FakeDiscord, tmp_path: Path) -> None:
    models_config(tmp_path, fake, CONFIG)
    path = tmp_path / "config.toml"
    path.write_text(path.read_text().replace("[limits]\n", "[limits]\nmax_side = 96\n"))
    async with running(fake, load_settings(path)) as bot:
        said = await sentence(await fake.slash_command("imagine", {"prompt": "a tree", "hires": 2.0}))
        assert said == (
            "Hires 2x of 64x64 makes 128x128, over the 96 pixels a side allowed here: "
            "lower the size or the hires scale."
        )
        row = (await bot.store.history(fake.alice.id, limit=1))[0]
        assert (row.status, row.reason, row.hires_scale) == ("failed", said, 2.0)


def test_the_cost_cap_counts_both_passes(tmp_path: Path) -> None:
    # 64² at 10 steps, then 128² at int(10 * 0.5) = 5 steps: 40,960 + 81,920 units of work
    (tmp_path / "config.toml").write_text('[model]\npath = "sd"\n[limits]\nmax_cost = 122880')
    policy = Policy(load_settings(tmp_path / "config.toml"), {"sd": sdengine.ModelInfo("sd", 64, 8, False)})
    request = GenerationRequest("a tree", steps=10, hires_scale=2, hires_steps=10, model="sd")
    assert policy.problem(request, user_id=1) is None
    assert policy.problem(replace(request, hires_strength=0.6), user_id=1) == (
        "1 image of 64x64 at 10 steps, with hires 2x to 128x128, is more work than allowed here: lower the steps, "
        "the size, the count or the hires scale."
    )
    assert policy.problem(replace(request, hires_scale=None, steps=30), user_id=1) is None  # the same work in one pass
