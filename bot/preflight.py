"""What can be checked without Discord: the database and the model, or the Ray cluster that runs it.

`sdbot` runs `open_database` and `load_models` (`start_cluster` with `[executor] backend = "ray"`) before it logs in,
so a broken setup is reported at once, in one line, not after a network round trip. `sdbot --check` runs `check`:
those two, then one tiny test generation.

Importing this module loads no torch: `load_models` does, and on the Ray backend only the workers ever load it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import sdengine
from bot.config import ConfigError, ModelSettings, Settings
from bot.store import Store, StoreError
from sdengine.info import ModelSpec
from sdengine.jobs import ExecutorConfig

if TYPE_CHECKING:  # Ray is an optional extra, imported only by `start_cluster`; torch only by `load_models`
    from sdengine.pool import ModelPool
    from sdengine.ray_cluster import Cluster


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


def load_models(settings: Settings) -> ModelPool:
    """Load `[model]` (or every `[models.NAME]`) as the bot does. A bad path, a missing device (`cuda` without CUDA)
    or a damaged file raises PreflightError naming the model."""
    from sdengine.pool import ModelPool, PoolLoadError

    specs = {model.label: model_spec(settings, model) for model in settings.all_models}
    try:
        return ModelPool.load(specs, settings.model.label, settings.executor.max_loaded)
    except PoolLoadError as err:
        which = repr(err.path) if err.name == err.path else f"{err.name!r} ({err.path!r})"
        # An engine error says what to do; anything else (a CUDA driver error, say) is still the setup's.
        why = str(err) if isinstance(err.cause, sdengine.SDEngineError) else _describe(err.cause)
        raise PreflightError(f"model {which} cannot be loaded: {why}") from err


def model_spec(settings: Settings, model: ModelSettings) -> ModelSpec:
    return ModelSpec(
        model.path,
        model.device,
        model.dtype,
        settings.safety.checker != "off",
        model.memory,
        model.compile,
        model.loras,
        model.channels_last,
        model.fuse_qkv,
        model.cuda_graphs,
    )


def executor_config(settings: Settings) -> ExecutorConfig:
    """The executor's settings from `[limits]`, for either backend."""
    limits = settings.limits
    return ExecutorConfig(
        max_batch=limits.max_batch or None,
        max_pending_per_owner=limits.max_pending_per_user,
        max_queued=limits.max_queue,
        job_timeout=limits.job_timeout_seconds,
    )


def start_cluster(settings: Settings) -> Cluster:
    """Connect to `[executor.ray]` and start its workers, each with `[model]` loaded. An unreachable cluster, too few
    GPUs or a model that does not load on the workers raises PreflightError, and nothing is left running."""
    try:
        from sdengine.ray_cluster import ClusterError
        from sdengine.ray_cluster import start_cluster as start
    except ImportError as err:
        raise PreflightError(
            f'[executor] backend = "ray" needs Ray ({err.name or err} is missing): pip install "sdbot[ray]"'
        ) from err
    ray = settings.executor.ray
    spec = model_spec(settings, settings.model)
    try:
        return start(ray.address, ray.workers, ray.gpus_per_worker, spec, executor_config(settings))
    except ClusterError as err:
        raise PreflightError(str(err)) from err
    except Exception as err:  # Ray's own errors: still the setup, never a traceback
        raise PreflightError(
            f"the Ray cluster at {ray.address!r} cannot be used: {_describe(err)}: check [executor.ray]"
        ) from err


def preflight_request(info: sdengine.ModelInfo | sdengine.Model, settings: Settings) -> sdengine.GenerationRequest:
    """One step at the smallest size the model allows, with the configured scheduler and guidance: it runs every
    part of the pipeline (text encoder, UNet, scheduler, VAE, safety checker) in well under a second on a GPU."""
    info = sdengine.describe(info)
    side = 8 * info.latent_factor  # the smallest side check_inputs accepts
    return sdengine.GenerationRequest(
        "a preflight check",
        negative=settings.defaults.negative,
        scheduler=settings.defaults.scheduler,
        steps=1,
        guidance=settings.defaults.guidance,
        seed=0,
        width=side,
        height=side,
        safety_check=info.has_safety_checker,
    )


def generate_test_image(model: sdengine.Model, settings: Settings) -> sdengine.GenerationResult:
    """The test request, run in this process."""
    try:
        return sdengine.generate(model, preflight_request(model, settings))
    except Exception as err:  # OutOfMemory, a CUDA error, ...: the one line is what the operator needs
        raise PreflightError(f"the test generation failed: {_describe(err)}") from err


def generate_on_cluster(cluster: Cluster, settings: Settings) -> sdengine.GenerationResult:
    """The test request, run on one of the cluster's workers."""
    from sdengine.ray_executor import RayExecutor

    async def run() -> sdengine.GenerationResult:
        executor = RayExecutor(cluster, executor_config(settings))
        try:
            return await executor.submit(preflight_request(cluster.info, settings), "preflight").result()
        finally:
            await executor.shutdown()

    try:
        return asyncio.run(run())
    except Exception as err:
        raise PreflightError(f"the test generation on the Ray cluster failed: {_describe(err)}") from err


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

    if settings.executor.backend == "ray":
        _check_cluster(settings, say)
    else:
        _check_local(settings, say)

    try:
        settings.token(env)
    except ConfigError as err:
        say(f"warning: {err} before you start the bot")


def _check_local(settings: Settings, say: Callable[[str], None]) -> None:
    started = time.perf_counter()
    pool = load_models(settings)
    loaded = time.perf_counter() - started
    for name in sorted(pool.names, key=lambda n: n != pool.default):  # the default first: it is on the device
        started = time.perf_counter()
        model = pool.acquire(name, set())
        checker = "with" if model.safety_checker is not None else "without"
        which = repr(name) if name == model.name else f"{name!r} ({model.name!r})"
        flags = {
            "compiled": model.compiled,
            "CUDA graphs": model.cuda_graphs,
            "channels_last": model.channels_last,
            "fused qkv": model.fused_qkv,
        }
        on = "".join(f", {flag}" for flag, is_on in flags.items() if is_on)
        say(
            f"model {which} loaded on {model.device} ({str(model.dtype).removeprefix('torch.')}, memory "
            f"{model.memory}{on}, {checker} a safety checker) in {loaded + time.perf_counter() - started:.1f} s"
        )
        loaded = 0.0  # the load of all of them is counted once, on the first line
        started = time.perf_counter()
        _say_generated(generate_test_image(model, settings), started, say)


def _check_cluster(settings: Settings, say: Callable[[str], None]) -> None:
    started = time.perf_counter()
    cluster = start_cluster(settings)
    try:
        info, nodes = cluster.info, sorted({r.node for r in cluster.ready})
        checker = "with" if info.has_safety_checker else "without"
        say(
            f"Ray cluster at {cluster.address!r}: {len(cluster.actors)} workers on {', '.join(nodes)} loaded model "
            f"{info.name!r} ({checker} a safety checker) in {time.perf_counter() - started:.1f} s"
        )
        started = time.perf_counter()
        _say_generated(generate_on_cluster(cluster, settings), started, say)
    finally:
        cluster.close()


def _say_generated(result: sdengine.GenerationResult, started: float, say: Callable[[str], None]) -> None:
    say(
        f"test image generated ({result.width}x{result.height}, 1 {result.scheduler} step) in"
        f" {time.perf_counter() - started:.1f} s"
    )


def _describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
