"""Start the real bot against the fake Discord, with the tiny model and a temporary SQLite file.

    async def test_x(harness: Harness) -> None:
        async with harness.running() as bot:
            inter = await harness.fake.slash_command("imagine", {"prompt": "a cat"})
            result = await harness.result_of(inter)

Import the fixtures into a test module with `from tests.botharness import fake_fixture, harness_fixture`.
`harness.running()` can be entered again for a restart on the same database and fake Discord.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
from PIL import Image

from bot.app import SDBot
from bot.config import Settings, load_settings
from bot.rows import Generation
from bot.store import Store
from sdengine import Model
from tests.fakediscord import FakeDiscord, FakeInteraction, FakeMessage, run_client

COMMANDS = ("imagine", "reroll", "history", "queue", "cancel", "models", "Make variations")
RESULT_ID = re.compile(r"gen:(\d+):reroll")


def png(color: str = "red", size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray[Any, Any]:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def custom_ids(message: FakeMessage) -> list[str]:
    return [c["custom_id"] for row in message.components for c in row.get("components", []) if "custom_id" in c]


def result_id(message: FakeMessage) -> int | None:
    """The generation id of a finished result message (it carries the Reroll button), else None."""
    for custom_id in custom_ids(message):
        match = RESULT_ID.fullmatch(custom_id)
        if match:
            return int(match[1])
    return None


async def sentence(inter: FakeInteraction, timeout: float = 60.0) -> str:
    """The one message an interaction ended with: ephemeral, text only, and alone (a "thinking" placeholder before
    it was deleted). A button acknowledged as an update of its message has that message as its original: it was
    there before the press, so it does not count."""
    message = await inter.wait_message(lambda m: m.ephemeral and not m.loading and not m.deleted, timeout=timeout)
    visible = [m for m in inter.messages if not m.deleted and m is not inter.source_message]
    assert visible == [message], [(m.content, m.ephemeral) for m in visible]
    assert not message.attachments and not message.components
    return message.content


def write_settings(tmp_path: Path, fake: FakeDiscord, *, discord: str = "") -> Settings:
    """Test settings: the tiny model, 3 steps by default, commands synced to the fake guild; `discord` adds lines
    to the [discord] table."""
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[discord]
guild_ids = [{fake.guild.id}]
{discord}

[model]
path = "tiny"

[storage]
database = "{(tmp_path / "sdbot.sqlite3").as_posix()}"

[defaults]
steps = 3

[limits]
max_steps = 50
max_pending_per_user = 5
"""
    )
    return load_settings(path)


@dataclass
class Harness:
    fake: FakeDiscord
    settings: Settings
    model: Model

    @contextlib.asynccontextmanager
    async def running(self, settings: Settings | None = None) -> AsyncIterator[SDBot]:
        bot = SDBot(
            settings or self.settings,
            model=self.model,
            progress_interval=0.05,
            guild_ready_timeout=0.05,
        )
        async with run_client(self.fake, bot):
            await self.fake.wait_commands_synced(*COMMANDS)
            yield bot

    async def rows_of(self, user_id: int) -> list[Generation]:
        """The user's rows, newest first, read through a second connection (WAL lets it read while the bot
        writes)."""
        async with await Store.open(self.settings.storage.database) as store:
            return await store.history(user_id, limit=1000)

    async def row(self, gen_id: int) -> Generation:
        async with await Store.open(self.settings.storage.database) as store:
            row = await store.get(gen_id)
        assert row is not None, f"no row #{gen_id}"
        return row

    async def wait_row(self, gen_id: int, predicate: Callable[[Generation], bool], timeout: float = 60.0) -> Generation:
        """Poll the row until `predicate` holds: the DB has no change notification to wait on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            row = await self.row(gen_id)
            if predicate(row):
                return row
            if loop.time() > deadline:
                raise TimeoutError(f"row #{gen_id} never matched; it is {row}")
            await asyncio.sleep(0.02)

    async def result_of(self, inter: FakeInteraction, timeout: float = 60.0) -> FakeMessage:
        """The finished result message that `inter` produced (its response, or a channel message after it)."""
        return await inter.wait_message(lambda m: result_id(m) is not None, timeout=timeout)

    async def wait_channel_result(self, after: int = 0, timeout: float = 60.0) -> FakeMessage:
        """The first finished result posted as a channel message (not through an interaction) after message id
        `after`."""
        return await self.fake.wait_for(
            lambda: next(
                (
                    m
                    for m in self.fake.messages
                    if m.id > after and m.interaction_id is None and result_id(m) is not None
                ),
                None,
            ),
            timeout,
        )


@pytest_asyncio.fixture(name="fake")
async def fake_fixture(caplog: pytest.LogCaptureFixture) -> AsyncIterator[FakeDiscord]:
    """A fake Discord; fails the test if discord.py or the bot logged an error, or a task outlived the bot."""
    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fake:
        yield fake
    # Every stage's records: in teardown, `caplog.records` holds only the teardown's own.
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert not errors, errors
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not leaked, leaked


@pytest.fixture(name="harness")
def harness_fixture(fake: FakeDiscord, tmp_path: Path, tiny: Model) -> Harness:
    return Harness(fake, write_settings(tmp_path, fake), tiny)


class GatedUNet(torch.nn.Module):
    """The real UNet behind a gate, an injected fake: while `gate` is clear, each step waits inside the UNet. A test
    holds the worker in the middle of a job with it, for as long as it needs, without timing guesses.

        unet = GatedUNet(tiny.unet)      # open; unet.gate.clear() to hold the next step
        Harness(fake, settings, dataclasses.replace(tiny, unet=unet))
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set by the first step that reaches the gate while it is clear
        self.started = 0
        self.finished = 0

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.started += 1
        if not self.gate.is_set():
            self.entered.set()
            self.gate.wait(timeout=120)
        output = self.unet(sample, *args, **kwargs)
        self.finished += 1
        return output

    async def hold(self) -> None:
        """Close the gate and wait until a step is waiting at it."""
        self.entered.clear()
        self.gate.clear()
        assert await asyncio.to_thread(self.entered.wait, 60), "no step reached the gate"
