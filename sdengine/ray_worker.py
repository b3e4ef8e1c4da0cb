"""One Ray worker: an async actor that loads the model once and runs today's `Executor` inside.

The bot process only names this class (it imports no torch): torch, the model and the executor are imported
in `__init__`, which runs in the worker's own process on its node. Every job the bot sends (`submit`) runs in
the local executor, with its per-step admission, continuous batching and out-of-memory learning; its events
wait in an outbox that the bot drains with one long poll per worker (`poll`), which also carries the
executor's stats. A poll that fails tells the bot that the worker died.

Events cross the process boundary pickled: previews and results are PIL images and bytes; a failure's error
is rebuilt as a plain engine error (`portable`), since not every exception pickles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import Cancelled, InvalidRequest, ModelLoadError, OutOfMemory, SDEngineError
from .info import ModelInfo, describe
from .info import ModelSpec as ModelSpec  # re-exported: callers name it from here
from .jobs import (
    Event,
    ExecutorConfig,
    ExecutorDown,
    ExecutorStats,
    Failed,
    Job,
    JobTimeout,
    Queued,
    ShuttingDown,
)
from .request import GenerationRequest

if TYPE_CHECKING:
    from .executor import Executor

log = logging.getLogger(__name__)

# Errors that travel as they are; any other one travels as a plain SDEngineError with its message.
_PORTABLE: tuple[type[SDEngineError], ...] = (
    ExecutorDown,
    ShuttingDown,
    JobTimeout,
    InvalidRequest,
    ModelLoadError,
    Cancelled,
    OutOfMemory,
)


@dataclass(frozen=True)
class Ready:
    """A worker's answer once its model is loaded, or why it could not load it."""

    pid: int
    node: str
    info: ModelInfo | None
    max_batch: int
    error: str = ""  # one line; the model did not load


@dataclass(frozen=True)
class Report:
    """One poll: the events after the poll's `seen`, in order, the number of the last of them, and the stats."""

    events: list[tuple[int, Event]] = field(default_factory=list)
    stats: ExecutorStats | None = None
    last: int = 0  # pass it as the next poll's `seen`


def portable(error: SDEngineError) -> SDEngineError:
    """The error as one that pickles and unpickles everywhere: its own class when it takes just a message."""
    kind = next((k for k in _PORTABLE if type(error) is k), SDEngineError)
    return kind(str(error))


def _wire(event: Event) -> Event:
    return Failed(portable(event.error)) if isinstance(event, Failed) else event


class Worker:
    """The actor class; `sdengine.ray_executor` wraps it with `ray.remote` and its options."""

    def __init__(self, spec: ModelSpec, config: ExecutorConfig) -> None:
        self._pid = os.getpid()
        self._node = socket.gethostname()
        self._executor: Executor | None = None
        self._info: ModelInfo | None = None
        self._error = ""
        self._jobs: dict[int, Job] = {}  # bot job id -> the local job
        self._cancelled: set[int] = set()  # cancels that came before their submit
        # (number, bot job id, event), numbered from 1, kept until a poll's `seen` acknowledges it
        self._outbox: list[tuple[int, int, Event]] = []
        self._posted = 0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        try:
            from .executor import Executor
            from .pool import load_spec

            model = load_spec(spec)
            self._executor = Executor(model, config)
            self._info = describe(model)
        except Exception as exc:  # reported by `ready` as one line, never a traceback
            lines = str(exc).strip().splitlines()
            self._error = lines[0] if isinstance(exc, SDEngineError) and lines else f"{type(exc).__name__}: {exc}"
            log.error("worker %d on %s cannot load model %r: %s", self._pid, self._node, spec.path, self._error)

    async def ready(self) -> Ready:
        max_batch = self._executor.max_batch if self._executor is not None else 0
        return Ready(self._pid, self._node, self._info, max_batch, self._error)

    async def submit(self, key: int, request: GenerationRequest, owner: str) -> None:
        """Start job `key`; its events, a refusal included, come back through `poll`."""
        if key in self._cancelled:
            self._cancelled.discard(key)
            return
        try:
            if self._executor is None:
                raise ExecutorDown(f"This worker could not load the model: {self._error}")
            job = self._executor.submit(request, owner)
        except SDEngineError as exc:
            self._post(key, Failed(exc))
            return
        self._jobs[key] = job
        task = asyncio.create_task(self._forward(key, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self, key: int) -> None:
        job = self._jobs.get(key)
        if job is None:
            self._cancelled.add(key)
        else:
            job.cancel()

    async def poll(self, wait: float, seen: int = 0) -> Report:
        """The events numbered after `seen`; waits up to `wait` seconds for the first one.

        An event stays until a later poll acknowledges it with its `seen`: a reply nobody reads (the poll of an
        executor that stopped meanwhile, which Ray still runs here) loses nothing for the next poller."""
        self._outbox = [item for item in self._outbox if item[0] > seen]
        if not self._outbox:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
        outbox = self._outbox
        stats = self._executor.stats() if self._executor is not None else None
        return Report([(key, event) for _, key, event in outbox], stats, outbox[-1][0] if outbox else seen)

    async def shutdown(self) -> None:
        """Finish the current step and fail the rest (`Executor.shutdown`); their events wait for `poll`."""
        if self._executor is not None:
            await self._executor.shutdown()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)
        self._wake.set()

    async def pid(self) -> int:
        return self._pid

    async def _forward(self, key: int, job: Job) -> None:
        async for event in job.events():
            if not isinstance(event, Queued):  # the bot's queue is the one users see
                self._post(key, event)
        del self._jobs[key]

    def _post(self, key: int, event: Event) -> None:
        self._posted += 1
        self._outbox.append((self._posted, key, _wire(event)))
        self._wake.set()


def actor_options(gpus_per_worker: float, max_restarts: int) -> dict[str, Any]:
    """Ray options of a worker: its GPUs, one CPU, and how often Ray restarts it after its process dies."""
    return {"num_cpus": 1, "num_gpus": gpus_per_worker, "max_restarts": max_restarts, "max_task_retries": 0}
