"""What can be checked without Discord: the database and the model.

`sdbot` runs `open_database` and `load_model` before it logs in, so a broken setup is reported at once, in one line,
not after a network round trip. `sdbot --check` runs `check`: those two, then one tiny test generation.

Importing this module loads torch (through sdengine), which takes seconds: import it only once the config is read.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import sdengine
from bot.config import ConfigError, Settings
from bot.store import Store, StoreError


class PreflightError(Exception):
    """The database or the model cannot be used; the message is one line that says what to change."""


def open_database(path: Path) -> None:
    """Open the database once, creating and migrating it, and close it again."""

    async def open_and_close() -> None:
        store = await Store.open(path)
        await store.close()

    try:
        # A path SQLite cannot open at all (a folder, no permission) fails here first: aiosqlite's worker thread
        # would report that failure after asyncio.run has closed its loop, with a traceback on stderr.
        path.parent.mkdir(parents=True, exist_ok=True)
        sqlite3.connect(path).close()
        asyncio.run(open_and_close())
    except StoreError as err:
        raise PreflightError(str(err)) from err
    except (OSError, sqlite3.Error) as err:
        # e.g. "unable to open database file" (a folder, no permission) or "file is not a database"
        raise PreflightError(f"database '{path}' cannot be used ({err}): check [storage] database") from err


def load_model(settings: Settings) -> sdengine.Model:
    """Load `[model]` as the bot does. A bad path, a missing device (`cuda` without CUDA) or a damaged file raises
    PreflightError."""
    model = settings.model
    try:
        return sdengine.load_model(
            model.path, device=model.device, dtype=model.dtype, safety_checker=settings.safety.checker != "off"
        )
    except sdengine.SDEngineError as err:
        raise PreflightError(f"model {model.path!r} cannot be loaded: {err}") from err
    except Exception as err:  # e.g. a CUDA driver error from torch: still the setup, not a bug of sdbot
        raise PreflightError(f"model {model.path!r} cannot be loaded: {_describe(err)}") from err


def generate_test_image(model: sdengine.Model, settings: Settings) -> sdengine.GenerationResult:
    """One step at the smallest size the model allows, with the configured scheduler and guidance: it runs every
    part of the pipeline (text encoder, UNet, scheduler, VAE, safety checker) in well under a second on a GPU."""
    side = 8 * model.latent_factor  # the smallest side check_inputs accepts
    request = sdengine.GenerationRequest(
        "a preflight check",
        negative=settings.defaults.negative,
        scheduler=settings.defaults.scheduler,
        steps=1,
        guidance=settings.defaults.guidance,
        seed=0,
        width=side,
        height=side,
        safety_check=model.safety_checker is not None,
    )
    try:
        return sdengine.generate(model, request)
    except Exception as err:  # OutOfMemory, a CUDA error, ...: the one line is what the operator needs
        raise PreflightError(f"the test generation failed: {_describe(err)}") from err


def check(
    settings: Settings,
    config_path: Path,
    *,
    env: Mapping[str, str],
    say: Callable[[str], None] = print,
) -> None:
    """`sdbot --check`: report each check in a line through `say`; raise PreflightError on the first failure.

    A missing token is only a warning: this is the command a newcomer runs before they have one."""
    say(f"config {str(config_path)!r} ok")
    open_database(settings.storage.database)
    say(f"database {str(settings.storage.database)!r} ok")

    started = time.perf_counter()
    model = load_model(settings)
    checker = "with" if model.safety_checker is not None else "without"
    say(
        f"model {model.name!r} loaded on {model.device} ({str(model.dtype).removeprefix('torch.')}, {checker} a safety"
        f" checker) in {time.perf_counter() - started:.1f} s"
    )

    started = time.perf_counter()
    result = generate_test_image(model, settings)
    say(
        f"test image generated ({result.width}x{result.height}, 1 {result.scheduler} step) in"
        f" {time.perf_counter() - started:.1f} s"
    )

    try:
        settings.token(env)
    except ConfigError as err:
        say(f"warning: {err} before you start the bot")


def _describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
