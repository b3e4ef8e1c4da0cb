"""The real bot in a child process, talking to a `FakeDiscord` that runs in the test process.

For what an in-process bot cannot show: a `kill -9` at any moment, a signal, a process's peak memory, a resource
limit of the operating system. The launcher is `python -m bot` aimed at the fake:

    python -m tests.botprocess PORT --config PATH [--log-level LEVEL]

and a test drives it like this:

    async with BotProcess.start(fake, config_path, log_path) as bot:   # returns once the bot has identified
        inter = await fake.slash_command("imagine", {"prompt": "a cat"})
        bot.kill()                                                      # SIGKILL, as a crash would
        await bot.wait()

Leaving the block kills the process if it still runs, so none outlives its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.fakediscord import FakeDiscord

ROOT = Path(__file__).resolve().parent.parent


def launch(argv: list[str]) -> int:
    """Point discord.py at the fake on 127.0.0.1:PORT (as `FakeDiscord.start` does in-process), then run the bot."""
    import discord
    import yarl

    port, rest = int(argv[0]), argv[1:]
    discord.http.Route.BASE = f"http://127.0.0.1:{port}/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(f"ws://127.0.0.1:{port}/")
    from bot.__main__ import main

    return main(rest)


def bot_config(tmp_path: Path, fake: FakeDiscord, *, steps: int = 3, **limits: float) -> Path:
    """Write a config for the bot process: the tiny model, `steps` by default, commands synced to the fake's guild,
    the database at tmp_path/sdbot.sqlite3, and `limits` in the [limits] table. Returns its path."""
    lines = "\n".join(f"{key} = {value!r}" for key, value in limits.items())
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[discord]
guild_ids = [{fake.guild.id}]

[model]
path = "tiny"

[storage]
database = "{(tmp_path / "sdbot.sqlite3").as_posix()}"

[defaults]
steps = {steps}

[limits]
max_steps = 50
{lines}
"""
    )
    return path


class BotProcess:
    """One run of the bot process; see the module docstring."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        fake: FakeDiscord,
        config: Path,
        log_path: Path,
        *,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> AsyncIterator[BotProcess]:
        """Start the bot and return once it has identified on the fake's gateway (its commands are synced by then,
        and any recovery has begun)."""
        identified = fake.identify_count
        environment = {
            **os.environ,
            "DISCORD_TOKEN": fake.token,
            # The tiny model gains nothing from more threads, and a busy machine makes torch's spinning threads slow.
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.botprocess",
                str(fake.port),
                "--config",
                str(config),
                cwd=ROOT,
                env=environment,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        bot = cls(process, log_path)
        try:
            # Until it identifies; fail fast, with its log, if it exits first or takes too long.
            exited = asyncio.ensure_future(process.wait())
            ready = asyncio.ensure_future(fake.wait_for(lambda: fake.identify_count > identified, timeout))
            done, pending = await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if exited in done:
                raise RuntimeError(f"the bot exited with {process.returncode} before it was ready:\n{bot.log_tail()}")
            if ready.exception() is not None:
                raise TimeoutError(f"the bot did not identify within {timeout} s:\n{bot.log_tail()}")
            yield bot
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up, as in a crash or an OOM kill."""
        self.process.kill()

    def send_signal(self, number: signal.Signals) -> None:
        self.process.send_signal(number)

    async def wait(self, timeout: float = 60.0) -> int:
        """The exit status; negative for a signal."""
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"the bot did not exit within {timeout} s:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
