"""The executor's torch-free parts: its errors, config, events, stats, the `Job` handle, the fair queue and
the learned batch limit.

The bot imports these without loading torch; `sdengine.executor` owns the worker that uses them.

Errors `submit` or a job can raise, besides the engine's own (`sdengine.errors`):

SDEngineError
├── QueueFull          a queue cap was reached: try again later
├── JobTimeout         the job ran longer than its time limit
└── ShuttingDown       the executor stopped before the job could finish
    └── ExecutorDown   the worker stopped for good after repeated faults: an admin must restart the bot
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .errors import Cancelled, SDEngineError
from .request import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class QueueFull(SDEngineError):
    """`submit` was refused because a queue cap was reached. The message says how full it is."""

    def __init__(self, message: str, *, position: int, length: int) -> None:
        super().__init__(message)
        self.position = position  # the owner's next job in line, 0 if none
        self.length = length


class ShuttingDown(SDEngineError):
    """The executor stopped before the job could finish."""


class ExecutorDown(ShuttingDown):
    """The worker kept failing and stopped; nothing runs until the bot restarts.

    A subclass of `ShuttingDown`, so callers that already handle a stopped executor handle this one too."""


class JobTimeout(SDEngineError):
    """The job ran longer than its time limit."""


@dataclass(frozen=True)
class ExecutorConfig:
    max_batch: int | None = None  # ceiling of images per UNet call; None: batching.default_max_batch(device)
    max_pending_per_owner: int = 3  # queued + running jobs of one owner
    max_queued: int = 50  # queued jobs of all owners
    job_timeout: float = 600.0  # seconds a job may run, queue time not counted
    preview_every: int = 5  # steps between latent previews
    probe_after_steps: int = 50  # full, OOM-free steps before a lowered max_batch tries one image more


# Events, in the order a job sees them: Queued* Loading? Started Step* then one of Done / Failed / JobCancelled.
# `Loading` comes only when the job's model must first be brought to the device. On the Ray
# backend a worker that dies mid-job adds `Retried` (a `Queued`), and the job starts again: Queued* Started Step* ...
@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to start
    length: int


@dataclass(frozen=True)
class Retried(Queued):
    """Back in the queue after the worker running it died (Ray backend): it runs again from the start, same seed."""

    attempt: int = 2  # the start that comes next
    reason: str = ""


@dataclass(frozen=True)
class Loading:
    """The job's model is being brought to the device (`max_loaded` pushed it out); it starts after that."""

    model: str


@dataclass(frozen=True)
class Started:
    batch_size: int  # images running together, this job's included


@dataclass(frozen=True)
class Step:
    step: int
    total: int
    preview: object | None = None  # a small PIL image every `preview_every` steps


@dataclass(frozen=True)
class Done:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    error: SDEngineError


@dataclass(frozen=True)
class JobCancelled:
    pass


Event = Queued | Loading | Started | Step | Done | Failed | JobCancelled
_TERMINAL = (Done, Failed, JobCancelled)


@dataclass(frozen=True)
class ExecutorStats:
    queued: int
    running_jobs: int
    batch_size: int  # images in the latest step
    max_batch: int  # images per UNet call, as learned from out-of-memory errors
    steps_per_second: float  # steps per second over the latest steps
    completed: int
    failed: int
    paused: bool = False
    down: bool = False  # the worker stopped for good: `submit` raises `ExecutorDown`
    down_reason: str = ""  # why, for admins; empty while up
    workers: int = 1  # workers serving: the Ray backend has several
    loaded: tuple[str, ...] = ()  # the models on the device, least recently used first (local backend)


class Job:
    """A submitted request. Await `result()`, or iterate `events()`; `cancel()` works queued or running."""

    def __init__(self, job_id: int, owner: str, request: GenerationRequest, on_cancel: Callable[[Job], None]) -> None:
        self.id = job_id
        self.owner = owner
        self.request = request
        self.submitted_at = time.monotonic()
        self._on_cancel = on_cancel  # takes a queued job out of its queue
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._result: asyncio.Future[GenerationResult] = self._loop.create_future()
        self._cancel_requested = threading.Event()
        self.position = 0

    def cancel(self) -> None:
        """Stop the job: a queued job leaves the queue at once, a running one at the next step."""
        self._cancel_requested.set()
        self._on_cancel(self)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    @property
    def finished(self) -> bool:
        return self._result.done()

    async def result(self) -> GenerationResult:
        """The result; raises `Cancelled`, or the `SDEngineError` that failed the job (e.g. `InvalidRequest`)."""
        return await asyncio.shield(self._result)

    async def events(self) -> AsyncIterator[Event]:
        """Every event of this job, ending with its terminal event."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, _TERMINAL):
                return

    def _emit(self, event: Event) -> None:
        """Called from any thread; never raises, so a vanished listener cannot take the worker down."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the event loop is closed: nobody is left to tell, so stop working on it
            log.debug("job %s: event loop closed, dropped %s", self.id, type(event).__name__)
            self._cancel_requested.set()

    def _deliver(self, event: Event) -> None:
        if self._result.done():
            return  # a job ends once, whichever thread got there first
        if isinstance(event, Queued):
            self.position = event.position
        self._events.put_nowait(event)
        if isinstance(event, Done):
            self._result.set_result(event.result)
        elif isinstance(event, Failed):
            self._result.set_exception(event.error)
        elif isinstance(event, JobCancelled):
            self._result.set_exception(Cancelled("The request was cancelled."))
        if self._result.done():
            self._result.exception()  # mark retrieved: nobody has to await a cancelled job


class FairQueue:
    """Queued jobs in one lane per owner; owners take turns (round-robin), the front owner goes next.

    Not thread-safe: the executor holds its lock around every call."""

    def __init__(self) -> None:
        self._lanes: OrderedDict[str, deque[Job]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def check_room(self, owner: str, running: int, config: ExecutorConfig) -> None:
        """Raise `QueueFull` if `owner`, who has `running` jobs running, may not queue one more."""
        queued = len(self)
        mine = len(self._lanes.get(owner, ())) + running
        if mine >= config.max_pending_per_owner:
            first = next((i for i, job in enumerate(self.order(), 1) if job.owner == owner), 0)
            raise QueueFull(
                f"You already have {mine} requests waiting or running (the limit is "
                f"{config.max_pending_per_owner}): wait for one to finish.",
                position=first,
                length=queued,
            )
        if queued >= config.max_queued:
            raise QueueFull(
                f"The queue is full ({queued} requests): try again in a few minutes.", position=0, length=queued
            )

    def order(self) -> list[Job]:
        """Queued jobs in start order."""
        ranks = itertools.zip_longest(*self._lanes.values())
        return [job for rank in ranks for job in rank if job is not None]

    def front(self) -> Job | None:
        return next(iter(self._lanes.values()))[0] if self._lanes else None

    def push(self, job: Job) -> None:
        self._lanes.setdefault(job.owner, deque()).append(job)

    def push_front(self, job: Job) -> None:
        """Put a job that must run again at the very front: its owner's lane first, that lane next in turn."""
        lane = self._lanes.pop(job.owner, deque())
        lane.appendleft(job)
        self._lanes[job.owner] = lane
        self._lanes.move_to_end(job.owner, last=False)

    def pop(self) -> Job | None:
        """The next job that is not cancelled; its owner goes to the back of the line."""
        while self._lanes:
            owner, lane = next(iter(self._lanes.items()))
            job = lane.popleft()
            del self._lanes[owner]
            if lane:
                self._lanes[owner] = lane
            if not job.cancel_requested:
                return job
        return None

    def take(self, job: Job) -> None:
        """Take a queued job to start it, at the front or not; its owner goes to the back of the line."""
        lane = self._lanes.pop(job.owner)
        lane.remove(job)
        if lane:
            self._lanes[job.owner] = lane

    def cancel(self, job: Job) -> bool:
        """Take a cancelled job out of the queue and tell it; False if it was not queued (running or finished)."""
        if not self.remove(job):
            return False
        job._emit(JobCancelled())
        self.announce_positions()
        return True

    def remove(self, job: Job) -> bool:
        lane = self._lanes.get(job.owner)
        if lane is None or job not in lane:
            return False
        lane.remove(job)
        if not lane:
            del self._lanes[job.owner]
        return True

    def clear(self) -> list[Job]:
        jobs = self.order()
        self._lanes.clear()
        return jobs

    def announce_positions(self) -> None:
        order = self.order()
        for position, job in enumerate(order, 1):
            if job.position != position:
                job.position = position
                job._emit(Queued(position, len(order)))


class BatchLimit:
    """Images per UNet call, learned from out-of-memory errors (OOMs) in both directions.

    An OOM lowers the limit below the images of the call that ran out; after `probe_after` steps at the limit
    without an OOM, it rises by one image, up to `ceiling`."""

    def __init__(self, ceiling: int, probe_after: int) -> None:
        self.ceiling = ceiling
        self.value = ceiling
        self.probe_after = probe_after
        self.ooms = 0
        self._largest_fit = 0  # images in the largest call that worked since the last OOM
        self._quiet_steps = 0  # steps at the limit without an OOM since the limit last changed

    def fitted(self, images: int) -> None:
        self._largest_fit = max(self._largest_fit, images)

    def out_of_memory(self, images: int) -> None:
        """A call of `images` ran out: go to the largest call that worked since the last OOM, else to half."""
        self.ooms += 1
        self.value = max(1, min(images - 1, max(images // 2, self._largest_fit)))
        self._largest_fit = 0
        self._quiet_steps = 0
        log.warning("%d images ran out of memory: max_batch is now %d", images, self.value)

    def quiet_step(self, images: int) -> None:
        """A step of `images` without an OOM. Only steps at the limit say whether more would fit."""
        if self.value >= self.ceiling or images < self.value:
            return
        self._quiet_steps += 1
        if self._quiet_steps >= self.probe_after:
            self.value += 1
            self._quiet_steps = 0
            log.info("no out-of-memory for %d full steps: max_batch is now %d", self.probe_after, self.value)
