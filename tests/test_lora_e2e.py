"""LoRA through the bot: adapters listed at start, `/imagine` with a tag, refusals that still get their row,
the infotext's `Lora hashes`, and `/reroll` pixel for pixel, or without an adapter that is gone, saying so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdengine.lora import file_hash
from tests.botharness import fake_fixture, pixels, result_id, sentence
from tests.fakediscord import FakeDiscord
from tests.loramaker import make_lora
from tests.test_models_e2e import models_config, result_of, running

__all__ = ["fake_fixture"]  # used by name


async def test_imagine_with_a_lora_tag_and_its_reroll(
    fake: FakeDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    make_lora("tiny", loras / "alpha.safetensors", seed=1)
    make_lora("tiny", loras / "beta.safetensors", seed=2)
    config = f'[model]\npath = "tiny"\nloras = "{loras.as_posix()}"'
    async with running(fake, models_config(tmp_path, fake, config, max_loaded=0)) as bot:
        assert "LoRA adapters of 'tiny': alpha, beta" in caplog.text

        prompt = "a tree <lora:alpha:0.8>"
        first = await result_of(await fake.slash_command("imagine", {"prompt": prompt, "seed": 9}))
        row = await bot.store.get(result_id(first) or 0)
        assert row is not None and row.prompt == prompt
        infotext = first.attachments[0].data.decode("latin-1")
        assert prompt in infotext and f'Lora hashes: "alpha: {file_hash(loras / "alpha.safetensors")}"' in infotext
        plain = await result_of(await fake.slash_command("imagine", {"prompt": "a tree", "seed": 9}))
        assert not np.array_equal(pixels(plain.attachments[0].data), pixels(first.attachments[0].data))

        offered = await fake.autocomplete("imagine", {"prompt": "a tree", "lora": "be"}, "lora")
        assert [c["value"] for c in (await offered.wait_callback()).data["choices"]] == ["beta"]
        options = {"prompt": "a tree", "lora": "alpha:0.8", "seed": 9}  # the option writes the same tag
        by_option = await result_of(await fake.slash_command("imagine", options))
        assert np.array_equal(pixels(by_option.attachments[0].data), pixels(first.attachments[0].data))

        again = await result_of(await fake.slash_command("reroll", {"id": row.id}))
        assert "Exact reproduction" in again.content and "LoRA" not in again.content
        assert np.array_equal(pixels(again.attachments[0].data), pixels(first.attachments[0].data))

        for bad, said in (
            ("a tree <lora:nope:1>", "Unknown LoRA 'nope': this model has alpha, beta."),
            ("a tree <lora:alpha:3>", "The weight of LoRA 'alpha' must be between -2 and 2, not 3."),
        ):
            assert await sentence(await fake.slash_command("imagine", {"prompt": bad})) == said
            refused = (await bot.store.history(fake.alice.id, limit=1))[0]
            assert (refused.prompt, refused.status, refused.reason) == (bad, "failed", said)

    (loras / "alpha.safetensors").unlink()
    async with running(fake, models_config(tmp_path, fake, config, max_loaded=0)):
        without = await result_of(await fake.slash_command("reroll", {"id": row.id}))
        assert f"#{row.id} used LoRA alpha, no longer here, so this runs without it" in without.content
        assert np.array_equal(pixels(without.attachments[0].data), pixels(plain.attachments[0].data))
