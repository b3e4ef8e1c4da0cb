"""Several models through the bot: `/imagine model:`, `/models`, rerolls on each model, a switch under load within
`max_loaded`, and rows from before `[models]` that still reroll."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

import sdengine
from bot.app import SDBot
from bot.config import Settings, load_settings
from bot.policy import Policy
from tests.botharness import COMMANDS, fake_fixture, pixels, result_id, sentence
from tests.fakediscord import FakeDiscord, FakeInteraction, FakeMessage, run_client

__all__ = ["fake_fixture"]  # used by name

CEILING = 120.0  # seconds: generous, for a busy machine; every wait ends as soon as its state is reached


def models_config(tmp_path: Path, fake: FakeDiscord, models: str, *, max_loaded: int = 1) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[discord]
guild_ids = [{fake.guild.id}]

{models}

[executor]
max_loaded = {max_loaded}

[storage]
database = "{(tmp_path / "sdbot.sqlite3").as_posix()}"

[defaults]
steps = 2

[limits]
max_pending_per_user = 10
"""
    )
    return load_settings(path)


TWO_MODELS = """
[models.sd]
path = "tiny"
default = true

[models.xl]
path = "tiny-xl"
"""


@contextlib.asynccontextmanager
async def running(fake: FakeDiscord, settings: Settings) -> AsyncIterator[SDBot]:
    """The bot loading its models from the config, as `sdbot` does."""
    bot = SDBot(settings, progress_interval=0.05, guild_ready_timeout=0.05)
    async with run_client(fake, bot):
        await fake.wait_commands_synced(*COMMANDS)
        yield bot


async def result_of(inter: FakeInteraction) -> FakeMessage:
    return await inter.wait_message(lambda m: result_id(m) is not None and bool(m.attachments), timeout=CEILING)


async def test_imagine_and_reroll_on_each_model(fake: FakeDiscord, tmp_path: Path) -> None:
    async with running(fake, models_config(tmp_path, fake, TWO_MODELS)) as bot:
        listed = await sentence(await fake.slash_command("models"))
        assert listed.splitlines() == [
            "- sd · SD 1.x 64² · default · loaded",
            "- xl · SDXL 64² · not loaded: its first request waits for it",
        ]
        offered = await fake.autocomplete("imagine", {"prompt": "a tree", "model": "x"}, "model")
        callback = await offered.wait_callback()
        assert [c["value"] for c in callback.data["choices"]] == ["xl"]

        for name, source in (("sd", "tiny"), ("xl", "tiny-xl")):
            first = await result_of(await fake.slash_command("imagine", {"prompt": "a tree", "model": name}))
            gen_id = result_id(first)
            row = await bot.store.get(gen_id or 0)
            assert row is not None and row.model == name
            assert f"Model: {source}" in (first.attachments[0].data.decode("latin-1"))  # the PNG's infotext

            again = await result_of(await fake.slash_command("reroll", {"id": gen_id}))
            assert "Exact reproduction" in again.content and "no longer here" not in again.content
            assert np.array_equal(pixels(again.attachments[0].data), pixels(first.attachments[0].data))
        assert bot.executor.stats().loaded == ("xl",)  # max_loaded = 1: the last one used

        refused = await fake.slash_command("imagine", {"prompt": "a tree", "model": "sd3"})
        assert await sentence(refused) == "There is no model 'sd3' here: pick one of sd, xl."


async def test_a_switch_under_load_keeps_max_loaded_and_loses_no_request(fake: FakeDiscord, tmp_path: Path) -> None:
    async with running(fake, models_config(tmp_path, fake, TWO_MODELS)) as bot:
        on_device: list[int] = []
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                on_device.append(len(bot.executor.stats().loaded))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        users = [fake.alice, fake.bob, fake.carol]
        sent = await asyncio.gather(
            *(
                fake.slash_command(
                    "imagine", {"prompt": f"tree {i}", "model": "xl" if i % 2 else "sd"}, user=users[i % 3]
                )
                for i in range(8)
            )
        )
        results = await asyncio.gather(*(result_of(inter) for inter in sent))
        done.set()
        await watcher

        assert max(on_device) == 1
        rows = [await bot.store.get(result_id(m) or 0) for m in results]
        assert [r.status for r in rows if r] == ["done"] * 8
        assert sorted(r.model for r in rows if r) == ["sd"] * 4 + ["xl"] * 4


async def test_rows_from_before_models_still_reroll(fake: FakeDiscord, tmp_path: Path) -> None:
    """A bot that had one [model] (its rows store the path) moves to [models.NAME]: rerolls find the model by its
    path. A row whose model is gone reruns with the default and says so."""
    single = models_config(tmp_path, fake, '[model]\npath = "tiny"', max_loaded=0)
    async with running(fake, single) as bot:
        old = await result_of(await fake.slash_command("imagine", {"prompt": "a tree"}))
        assert (await bot.store.get(result_id(old) or 0)).model == "tiny"  # type: ignore[union-attr]
    renamed = models_config(tmp_path, fake, '[models.legacy]\npath = "tiny"', max_loaded=0)
    async with running(fake, renamed):
        gone = await result_of(await fake.slash_command("imagine", {"prompt": "a boat"}))

    async with running(fake, models_config(tmp_path, fake, TWO_MODELS)):
        again = await result_of(await fake.slash_command("reroll", {"id": result_id(old)}))
        assert "no longer here" not in again.content
        assert np.array_equal(pixels(again.attachments[0].data), pixels(old.attachments[0].data))

        stand_in = await result_of(await fake.slash_command("reroll", {"id": result_id(gone)}))
        assert "made with model 'legacy', which is no longer here, so this uses the default model 'sd'" in (
            stand_in.content
        )


def test_each_model_has_its_own_size_limits(tmp_path: Path) -> None:
    """[limits] are meant for 512² models: a 1024² model gets them scaled, unless its table sets its own."""
    (tmp_path / "config.toml").write_text(
        '[models.sd]\npath = "sd"\n[models.xl]\npath = "xl"\n[models.capped]\npath = "c"\nmax_side = 640\nmax_cost = 99'
    )
    settings = load_settings(tmp_path / "config.toml")
    sd1 = sdengine.ModelInfo("sd", 512, 8, has_safety_checker=False)
    xl = sdengine.ModelInfo("xl", 1024, 8, has_safety_checker=False, kind="sdxl")
    policy = Policy(settings, {"sd": sd1, "xl": xl, "capped": xl})
    limits = settings.limits
    assert policy.size_limits("sd") == (limits.max_side, limits.max_cost)
    assert policy.size_limits("xl") == (2 * limits.max_side, 4 * limits.max_cost)
    assert policy.size_limits("capped") == (640, 99)
    square = sdengine.GenerationRequest("a tree", steps=25, count=4, model="xl")  # 4 at SDXL's native 1024²
    assert policy.problem(square, user_id=1) is None
    assert "more work than allowed" in (policy.problem(dataclasses.replace(square, model="capped"), 1) or "")
    assert policy.image_size(1000, 1000, "xl") == (1024, 1024)
