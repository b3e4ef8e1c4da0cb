"""`python -m bot --config PATH` / `sdbot --config PATH`: run the bot until interrupted.

SIGTERM or SIGINT (Ctrl-C) stops it cleanly: new requests are refused, the current denoising step finishes, the
rest is failed with a message to its user and a row in the database, and the database is closed. A second signal
stops it at once; what that leaves unfinished runs again at the next start.

Exit status: 0 after a clean stop, 1 when Discord refuses the token or the model or database cannot be used, 2 for
a bad config or a missing token (one line on stderr says what to change).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import discord

from bot.config import ConfigError, load_settings

log = logging.getLogger("bot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdbot", description="A self-hosted Stable Diffusion bot for Discord.")
    parser.add_argument("--config", type=Path, default=Path("config.toml"), help="the TOML config file")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        token = settings.token()
    except ConfigError as err:
        print(f"sdbot: {err}", file=sys.stderr)
        return 2

    discord.utils.setup_logging(level=getattr(logging, args.log_level), root=True)
    # Imported only now: it loads torch, which takes seconds that a config error should not wait for.
    import sdengine
    from bot.app import SDBot
    from bot.store import StoreError

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        stop_signals = [signal.SIGINT, signal.SIGTERM]  # Ctrl-C; systemd and docker stop with SIGTERM

        def stop(name: str) -> None:
            # Cancelling the main task makes `async with` close the bot: it refuses new requests, lets the current
            # step finish, fails the rest with a message and a row, and closes the database.
            log.info("%s: shutting down cleanly (send it again to stop at once)", name)
            for number in stop_signals:
                loop.remove_signal_handler(number)  # a second signal gets the default behaviour
            if task is not None:
                task.cancel()

        for number in stop_signals:
            with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' event loop
                loop.add_signal_handler(number, stop, number.name)
        async with SDBot(settings) as bot:
            await bot.start(token)  # never logged: discord.py sends it only in headers and IDENTIFY

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.info("stopped")
    except discord.LoginFailure:
        print(f"sdbot: Discord refused the token in {settings.discord.token_env}: check it", file=sys.stderr)
        return 1
    except discord.PrivilegedIntentsRequired:
        print("sdbot: Discord refused the gateway intents: see the README", file=sys.stderr)
        return 1
    except (sdengine.ModelLoadError, StoreError) as err:
        print(f"sdbot: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
