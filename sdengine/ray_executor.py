"""The executor on a Ray cluster: the same API as `sdengine.executor.Executor`, with the work done by Ray workers.

The bot process keeps what must be global: one `FairQueue` (owners take turns across the whole cluster), the caps
(they count the jobs running on every worker) and the queue positions users see. Each worker
(`sdengine.ray_worker.Worker`) runs today's local executor on its own device; this side hands a worker a job only
while it has room, counted in images (its `max_batch` less the images it runs), so no queue builds up on one worker
while another idles. One poll task per worker brings its events back to the job.

Faults:
- A worker whose poll fails has died (process killed, node lost). Its jobs go back to the front of the queue with a
  `Retried` event and run again from the start, with the same seed, on the next worker with room; Ray restarts the
  dead one (`max_restarts`), which takes jobs again once its model is loaded. A job whose worker died under it
  `MAX_DEATHS` times fails with a plain message.
- With no worker alive, `submit` raises `ExecutorDown` at once and `stats().down` says why; once every worker is
  gone for good, the queued jobs fail too.

Importing this module loads Ray, never torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import Any

import ray.exceptions

from .errors import SDEngineError
from .jobs import (
    Done,
    Event,
    ExecutorConfig,
    ExecutorDown,
    ExecutorStats,
    Failed,
    FairQueue,
    Job,
    JobCancelled,
    Retried,
    ShuttingDown,
)
from .ray_cluster import READY_TIMEOUT, Cluster
from .ray_worker import Ready, Report
from .request import GenerationRequest

log = logging.getLogger(__name__)

MAX_DEATHS = 3  # workers that may die under one job before it fails
POLL_WAIT = 10.0  # seconds one poll waits on the worker for its first event
RESTART_POLL = 0.5  # seconds between asks whether Ray has restarted a dead worker
DOWN_MESSAGE = "No generator worker is running right now: try again in a few minutes, or ask an admin to check it."
DEATHS_MESSAGE = (
    f"The generator worker running this request stopped {MAX_DEATHS} times: it may be what stops them, "
    "so it was not run again."
)
SHUTDOWN_MESSAGE = "The bot shut down before this request finished: please send it again."

_keys = itertools.count(1)  # job ids, unique in this process: workers may outlive one executor (tests reuse them)


@dataclass
class _Worker:
    """The bot's view of one worker: its room and the jobs it runs."""

    index: int
    actor: Any  # ray.actor.ActorHandle of `sdengine.ray_worker.Worker`
    pid: int
    max_batch: int
    alive: bool = True
    gone: bool = False  # dead for good: Ray will not restart it, or its model no longer loads
    jobs: dict[int, Job] = field(default_factory=dict)  # job id -> job, dispatched and not finished
    stats: ExecutorStats | None = None
    seen: int = 0  # the number of the last event received from its process, acknowledged by the next poll

    @property
    def images(self) -> int:
        return sum(job.request.count for job in self.jobs.values())

    def room(self) -> int:
        return self.max_batch - self.images


class RayExecutor:
    """Runs jobs on the workers of `cluster`; call it from one event loop, as the local executor."""

    def __init__(
        self,
        cluster: Cluster,
        config: ExecutorConfig | None = None,
        *,
        poll_wait: float = POLL_WAIT,
        revive_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.cluster = cluster
        self.config = config or ExecutorConfig()
        self.poll_wait = poll_wait
        self.revive_timeout = revive_timeout
        self._queue = FairQueue()
        self._workers = [
            _Worker(i, actor, ready.pid, ready.max_batch)
            for i, (actor, ready) in enumerate(zip(cluster.actors, cluster.ready, strict=True))
        ]
        self._deaths: dict[int, int] = {}  # job id -> workers that died under it
        self._dispatched_at: dict[int, float] = {}
        self._completed = 0
        self._failed = 0
        self._paused = False
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        for worker in self._workers:
            self._spawn(self._poll(worker))

    # ---- the executor API ------------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        """Images per UNet call, summed over the live workers."""
        return sum(w.max_batch for w in self._workers if w.alive)

    def submit(self, request: GenerationRequest, owner: str) -> Job:
        """Queue a request, or raise `QueueFull`/`ShuttingDown`/`ExecutorDown` at once."""
        if self._stopping:
            raise ShuttingDown("The generator is shutting down: try again in a minute.")
        if not any(w.alive for w in self._workers):
            raise ExecutorDown(DOWN_MESSAGE)
        self._queue.check_room(owner, sum(job.owner == owner for job in self.running_jobs()), self.config)
        request = replace(request, model=None)  # every worker serves the one model it loaded
        job = Job(next(_keys), owner, request, self._cancel)
        self._queue.push(job)
        self._queue.announce_positions()
        self._dispatch()
        return job

    def stats(self) -> ExecutorStats:
        live = [w for w in self._workers if w.alive]
        reported = [w.stats for w in live if w.stats is not None]
        reason = self._down_reason()
        return ExecutorStats(
            queued=len(self._queue),
            running_jobs=sum(len(w.jobs) for w in self._workers),
            batch_size=sum(s.batch_size for s in reported),
            max_batch=self.max_batch,
            steps_per_second=sum(s.steps_per_second for s in reported),
            completed=self._completed,
            failed=self._failed,
            paused=self._paused,
            down=bool(reason),
            down_reason=reason,
            workers=len(live),
        )

    def running_jobs(self) -> list[Job]:
        return [job for w in self._workers for job in w.jobs.values()]

    def worker_of(self, job: Job) -> int | None:
        """The pid of the worker process that runs `job`, or None while it is queued or finished."""
        return next((w.pid for w in self._workers if job.id in w.jobs), None)

    def pause(self, paused: bool = True) -> None:
        """A paused executor lets the workers finish what runs and hands them nothing new."""
        self._paused = paused
        self._dispatch()

    async def shutdown(self) -> None:
        """Fail what is queued, cancel what runs on the workers, and stop polling them. The workers stay up:
        `Cluster.close` stops them."""
        self._stopping = True
        for job in self._queue.clear():
            self._fail(job, ShuttingDown(SHUTDOWN_MESSAGE))
        for worker in self._workers:
            for job in list(worker.jobs.values()):
                self._call(worker.actor.cancel.remote(job.id))
                self._fail(job, ShuttingDown(SHUTDOWN_MESSAGE))
            worker.jobs.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    # ---- scheduling ------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued jobs, in fair order, to the live worker with the most room while one has room for the next:
        a job runs whole, so an idle worker takes any job."""
        while not self._paused and not self._stopping and (job := self._queue.front()) is not None:
            live = [w for w in self._workers if w.alive]
            fits = [w for w in live if not w.jobs or w.room() >= job.request.count]
            if not fits:
                break
            worker = max(fits, key=lambda w: (w.room(), -w.index))
            popped = self._queue.pop()  # the front job, or None if it was cancelled meanwhile
            if popped is None:
                break
            worker.jobs[popped.id] = popped
            self._dispatched_at[popped.id] = time.monotonic()
            self._call(worker.actor.submit.remote(popped.id, popped.request, popped.owner))
            log.debug("job %d of %s to worker %d (pid %d)", popped.id, popped.owner, worker.index, worker.pid)
        self._queue.announce_positions()

    def _cancel(self, job: Job) -> None:
        """`Job.cancel`: a queued job leaves the queue at once; a running one stops at its worker's next step."""
        if self._queue.cancel(job):
            return
        worker = next((w for w in self._workers if job.id in w.jobs), None)
        if worker is not None:
            self._call(worker.actor.cancel.remote(job.id))

    def _down_reason(self) -> str:
        if any(w.alive for w in self._workers):
            return ""
        restarting = sum(not w.gone for w in self._workers)
        if restarting:
            return f"no Ray worker is alive ({restarting} restarting)"
        return "every Ray worker is gone: check the cluster (`ray status`), then restart the bot"

    # ---- one task per worker ---------------------------------------------------------------------------

    async def _poll(self, worker: _Worker) -> None:
        """Forward the worker's events to its jobs; when it dies, retry its jobs and wait for Ray to restart it."""
        while not worker.gone:
            try:
                report: Report = await worker.actor.poll.remote(self.poll_wait, worker.seen)
            except ray.exceptions.RayActorError as exc:
                self._died(worker, exc)
                await self._revive(worker)
                continue
            except Exception:  # e.g. a report that did not unpickle: the worker itself is up
                log.exception("polling Ray worker %d (pid %d) failed; polling again", worker.index, worker.pid)
                await asyncio.sleep(1.0)
                continue
            worker.seen = report.last
            worker.stats = report.stats
            if report.stats is not None:
                worker.max_batch = report.stats.max_batch
            for key, event in report.events:
                self._forward(worker, key, event)
            self._dispatch()

    def _forward(self, worker: _Worker, key: int, event: Event) -> None:
        job = worker.jobs.get(key)
        if job is None:  # finished here already (shutdown), or a job of an earlier executor
            return
        if isinstance(event, Done | Failed | JobCancelled):
            del worker.jobs[key]
            self._deaths.pop(key, None)
            dispatched = self._dispatched_at.pop(key, job.submitted_at)
            if isinstance(event, Done):
                # The bot's queue time as well as the worker's own.
                timings = event.result.timings
                timings["queued"] = timings.get("queued", 0.0) + dispatched - job.submitted_at
                self._completed += 1
            elif isinstance(event, Failed):
                self._failed += 1
        job._emit(event)

    def _died(self, worker: _Worker, exc: BaseException) -> None:
        """Put the dead worker's jobs back at the front of the queue, in their order, or fail those it killed
        `MAX_DEATHS` times."""
        worker.alive = False
        worker.stats = None
        worker.seen = 0  # its restarted process numbers its events from 1 again
        jobs = list(worker.jobs.values())
        worker.jobs.clear()
        reason = f"the worker running it (pid {worker.pid}) stopped"
        log.warning(
            "Ray worker %d (pid %d) died (%s): %d jobs go back to the queue",
            worker.index,
            worker.pid,
            type(exc).__name__,
            len(jobs),
        )
        for job in reversed(jobs):
            self._dispatched_at.pop(job.id, None)
            deaths = self._deaths[job.id] = self._deaths.get(job.id, 0) + 1
            if job.cancel_requested:
                job._emit(JobCancelled())
            elif deaths >= MAX_DEATHS:
                log.error("job %d failed: %d workers died under it", job.id, deaths)
                self._fail(job, SDEngineError(DEATHS_MESSAGE))
            else:
                log.warning("job %d runs again from the start (attempt %d): %s", job.id, deaths + 1, reason)
                self._queue.push_front(job)
                job.position = 1  # told by `Retried`, not by the next `announce_positions`
                job._emit(Retried(1, len(self._queue), attempt=deaths + 1, reason=reason))
        self._fail_all_if_gone()
        self._dispatch()

    async def _revive(self, worker: _Worker) -> None:
        """Wait for Ray to restart the worker and load its model; it is gone for good if that fails."""
        ready = await _ready(worker.actor, self.revive_timeout)
        if ready.error or ready.info is None:
            worker.gone = True
            log.error("Ray worker %d (pid %d) is gone for good (%s)", worker.index, worker.pid, ready.error)
            self._fail_all_if_gone()
            return
        worker.pid, worker.max_batch, worker.alive = ready.pid, ready.max_batch, True
        log.info("Ray worker %d is back (pid %d on %s)", worker.index, ready.pid, ready.node)
        self._dispatch()

    def _fail_all_if_gone(self) -> None:
        if all(w.gone for w in self._workers):
            for job in self._queue.clear():
                self._fail(job, ExecutorDown(DOWN_MESSAGE))

    # ---- helpers ---------------------------------------------------------------------------------------

    def _fail(self, job: Job, error: SDEngineError) -> None:
        self._failed += 1
        job._emit(Failed(error))

    def _call(self, ref: Any) -> None:
        """Send a call to a worker without waiting for it; a dead worker shows in its poll instead."""
        self._spawn(_quietly(ref))

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _quietly(ref: Any) -> None:
    with contextlib.suppress(ray.exceptions.RayError):
        await ref


async def _ready(actor: Any, timeout: float) -> Ready:
    """The restarted actor's `Ready`; Ray answers `ActorUnavailableError` until the restart has begun."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ready: Ready = await asyncio.wait_for(_result(actor.ready.remote()), deadline - time.monotonic())
            return ready
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                return Ready(0, "", None, 0, error=f"not restarted within {timeout:g} s")
            await asyncio.sleep(RESTART_POLL)
        except TimeoutError:
            return Ready(0, "", None, 0, error=f"not restarted within {timeout:g} s")
        except ray.exceptions.RayError as exc:  # ActorDiedError: its restarts are used up, or it was killed for good
            return Ready(0, "", None, 0, error=type(exc).__name__)


async def _result(ref: Any) -> Any:
    return await ref
