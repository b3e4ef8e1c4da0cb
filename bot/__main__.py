"""`sdbot --config PATH` / `python -m bot --config PATH`: run the bot until interrupted.

Start-up checks what it can without the network first: the config, the token's variable, the database and the
model. Only then does it log in, so a broken setup is reported at once in one line. `sdbot --check` runs those
checks plus one tiny test generation, and never connects to Discord.

Once logged in, a lost connection is retried with exponential backoff, one log line per attempt.

SIGTERM or SIGINT (Ctrl-C) stops it cleanly: new requests are refused, the current denoising step finishes, the
rest is failed with a message to its user and a row in the database, and the database is closed. A second signal
stops it at once; what that leaves unfinished runs again at the next start.

Exit status (also in --help), each failure with one line on stderr that says what to change:
0 a clean stop, or --check passed; 1 the database, model or Ray cluster cannot be used, or Discord refused the token
or the intents; 2 a bad config or command line, or no token in the environment; 3 Discord cannot be reached at start
(network, DNS, firewall, outage).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import ConfigError, load_settings

if TYPE_CHECKING:
    import aiohttp

# discord.py, aiohttp and torch are imported only once the config is read: --help and a config error come back at
# once (torch alone takes seconds).

log = logging.getLogger("bot")

EXIT_OK = 0  # a clean stop, or --check passed
EXIT_SETUP = 1  # the database, model or Ray cluster cannot be used, or Discord refused the token or intents
EXIT_CONFIG = 2  # a bad config file or command line, or no token in the environment
EXIT_UNREACHABLE = 3  # Discord cannot be reached at start (network, DNS, firewall, outage): worth retrying later

EPILOG = f"""\
The bot token is read from the environment variable DISCORD_TOKEN (another name can be set in the config's
[discord] token_env); it never goes in the config file. --check does not need it.

exit status:
  {EXIT_OK}  stopped cleanly (SIGTERM or Ctrl-C), or --check passed
  {EXIT_SETUP}  the database, the model or the Ray cluster cannot be used, or Discord refused the token or the intents
  {EXIT_CONFIG}  bad config file or command line, or the token variable is not set
  {EXIT_UNREACHABLE}  Discord cannot be reached at start (network, DNS or firewall, or a Discord outage)
Every failure is one line on stderr that says what to change.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sdbot",
        description="A self-hosted Stable Diffusion bot for Discord.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, default=Path("config.toml"), help="the TOML config file (default: %(default)s)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config, the database and the model (with one tiny test generation), then exit;"
        " never connects to Discord",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('sdbot')}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
        token = "" if args.check else settings.token()
    except ConfigError as err:
        return fail(str(err), EXIT_CONFIG)

    from bot import preflight

    if args.check:
        try:
            preflight.check(settings, args.config, env=os.environ, say=lambda line: print(f"sdbot: {line}"))
        except preflight.PreflightError as err:
            return fail(str(err), EXIT_SETUP)
        print(f"sdbot: all checks passed; start the bot with: sdbot --config {args.config}")
        return EXIT_OK

    import aiohttp
    import discord

    discord.utils.setup_logging(level=getattr(logging, args.log_level), root=True)
    logging.getLogger("discord.client").addFilter(OneLineReconnects())
    for warning in ("warn_nacl", "warn_dave"):  # the bot has no voice: its missing libraries are no news
        if hasattr(discord.VoiceClient, warning):
            setattr(discord.VoiceClient, warning, False)
    model, cluster = None, None
    try:
        # Everything that needs no Discord, before the login: a broken setup shows at once.
        preflight.open_database(settings.storage.database)
        if settings.executor.backend == "ray":  # the workers load the model; this process loads no torch
            log.info("starting the Ray workers at %r with model %r", settings.executor.ray.address, settings.model.path)
            cluster = preflight.start_cluster(settings)
        else:
            paths = ", ".join(repr(m.path) for m in settings.all_models)
            log.info("loading model %s on %s (%s)", paths, settings.model.device, settings.model.dtype)
            model = preflight.load_models(settings)
    except preflight.PreflightError as err:
        return fail(str(err), EXIT_SETUP)
    except KeyboardInterrupt:
        log.info("stopped")
        return EXIT_OK

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
        async with SDBot(settings, model=model, cluster=cluster) as bot:
            await bot.start(token)  # never logged: discord.py sends it only in headers and IDENTIFY

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.info("stopped")
    except discord.LoginFailure:
        return fail(f"Discord refused the token in {settings.discord.token_env}: check it", EXIT_SETUP)
    except discord.PrivilegedIntentsRequired:
        return fail("Discord refused the gateway intents: see the README", EXIT_SETUP)
    except aiohttp.ClientConnectionError as err:
        # Only the login can end here: once connected, discord.py retries lost connections itself.
        return fail(f"cannot reach Discord at {where(err)} ({why(err)}): check the network", EXIT_UNREACHABLE)
    except discord.DiscordServerError as err:  # 5xx, after discord.py's own retries
        return fail(f"Discord is unavailable (HTTP {err.status}): try again later", EXIT_UNREACHABLE)
    except StoreError as err:  # the second open, in setup_hook, can still meet a newer schema
        return fail(str(err), EXIT_SETUP)
    finally:
        if cluster is not None:
            cluster.close()
    return EXIT_OK


def fail(message: str, status: int) -> int:
    print(f"sdbot: {message}", file=sys.stderr)
    return status


def where(err: aiohttp.ClientConnectionError) -> str:
    """host:port that failed; for errors that do not say, the REST API's (which tests point at a fake)."""
    import aiohttp
    import discord
    import yarl

    if isinstance(err, aiohttp.ClientConnectorError):
        return f"{err.host}:{err.port}"
    url = yarl.URL(discord.http.Route.BASE)
    return f"{url.host}:{url.port}"


def why(err: BaseException) -> str:
    """A few words for the cause of a connection error, without the traceback."""
    import aiohttp

    cause = err.os_error if isinstance(err, aiohttp.ClientConnectorError) else err
    if isinstance(cause, socket.gaierror):
        return "its name does not resolve"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, TimeoutError):
        return "timed out"
    return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__


class OneLineReconnects(logging.Filter):
    """discord.py logs each reconnect attempt with `_log.exception`: a traceback per try, for as long as the
    network is down. Keep it to one warning line that names the cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Attempting a reconnect"):
            error, message = record.exc_info[1], record.getMessage()
            cause = why(error) if error is not None else "unknown cause"
            record.msg = f"cannot reach Discord ({cause}): {message[:1].lower()}{message[1:]}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


if __name__ == "__main__":
    sys.exit(main())
