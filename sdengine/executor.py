"""One worker thread per device that serves many owners fairly and batches their UNet steps together.

The asyncio side only ever calls `submit`, `Job.events`, `Job.result`, `Job.cancel`, `stats` and
`shutdown`; every torch call happens on the worker thread, and events cross back to the event loop with
`loop.call_soon_threadsafe`.

Scheduling, in short:
- Queued jobs wait in one deque per owner; owners take turns (round-robin), so an owner with ten jobs
  delays an owner with one by at most one job.
- Between two steps the worker admits queued jobs while the batch has room (`max_batch` images), and
  drops finished, cancelled or timed-out ones. All running images then share one UNet call per latent
  shape, each at its own timestep with its own scheduler (continuous batching).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from PIL import Image

from .errors import Cancelled, OutOfMemory, SDEngineError
from .models import Model
from .pipeline import Plan, Sample, advance, decode, finish, predict_noise, prepare, preview
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


class JobTimeout(SDEngineError):
    """The job ran longer than its time limit."""


def default_max_batch(device: torch.device) -> int:
    """Images per UNet call. On a CPU, memory bandwidth makes big batches slower than solo runs of SD-sized
    models (see bench/throughput.py), so it runs solo; GPUs gain from batching."""
    return {"cuda": 8, "mps": 4}.get(device.type, 1)


@dataclass(frozen=True)
class ExecutorConfig:
    max_batch: int | None = None  # images per UNet call; None: default_max_batch(device)
    max_pending_per_owner: int = 3  # queued + running jobs of one owner
    max_queued: int = 50  # queued jobs of all owners
    job_timeout: float = 600.0  # seconds a job may run, queue time not counted
    preview_every: int = 5  # steps between latent previews


# Events, in the order a job sees them: Queued* Started Step* then one of Done / Failed / JobCancelled.
@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to start
    length: int


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


Event = Queued | Started | Step | Done | Failed | JobCancelled
_TERMINAL = (Done, Failed, JobCancelled)


@dataclass(frozen=True)
class ExecutorStats:
    queued: int
    running_jobs: int
    batch_size: int  # images in the latest UNet step
    max_batch: int
    steps_per_second: float  # UNet steps per second over the latest steps
    completed: int
    failed: int
    paused: bool = False


class Job:
    """A submitted request. Await `result()`, or iterate `events()`; `cancel()` works queued or running."""

    def __init__(self, job_id: int, owner: str, request: GenerationRequest, executor: Executor) -> None:
        self.id = job_id
        self.owner = owner
        self.request = request
        self.submitted_at = time.monotonic()
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._result: asyncio.Future[GenerationResult] = self._loop.create_future()
        self._cancel_requested = threading.Event()
        self.position = 0

    def cancel(self) -> None:
        """Stop the job: a queued job leaves the queue at once, a running one at the next step."""
        self._cancel_requested.set()
        self._executor._cancel_queued(self)

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
        """Called from any thread."""
        self._loop.call_soon_threadsafe(self._deliver, event)

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


@dataclass
class _Running:
    job: Job
    plan: Plan
    started_at: float = field(default_factory=time.monotonic)

    @property
    def samples(self) -> list[Sample]:
        return self.plan.samples


class Executor:
    """Owns `model` on its own worker thread; see the module docstring for the scheduling rules."""

    def __init__(self, model: Model, config: ExecutorConfig | None = None) -> None:
        self.model = model
        self.config = config or ExecutorConfig()
        self.max_batch = self.config.max_batch or default_max_batch(model.device)
        self._lock = threading.Condition()
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # owner -> jobs; front owner goes next
        self._running: list[_Running] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self._paused = False
        self._completed = 0
        self._failed = 0
        self._batch_size = 0
        self._step_times: deque[float] = deque(maxlen=20)
        self._thread = threading.Thread(target=self._work, name=f"sdengine-{model.device}", daemon=True)
        self._thread.start()

    # ---- asyncio side -------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, owner: str) -> Job:
        """Queue a request, or raise `QueueFull`/`ShuttingDown` at once."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("The generator is shutting down: try again in a minute.")
            queued = sum(len(q) for q in self._queues.values())
            mine = len(self._queues.get(owner, ())) + sum(r.job.owner == owner for r in self._running)
            order = self._order()
            if mine >= self.config.max_pending_per_owner:
                first = next((i for i, j in enumerate(order, 1) if j.owner == owner), 0)
                raise QueueFull(
                    f"You already have {mine} requests waiting or running (the limit is "
                    f"{self.config.max_pending_per_owner}): wait for one to finish.",
                    position=first,
                    length=queued,
                )
            if queued >= self.config.max_queued:
                raise QueueFull(
                    f"The queue is full ({queued} requests): try again in a few minutes.",
                    position=0,
                    length=queued,
                )
            job = Job(next(self._ids), owner, request, self)
            self._queues.setdefault(owner, deque()).append(job)
            self._announce_positions()
            self._lock.notify()
        return job

    def stats(self) -> ExecutorStats:
        with self._lock:
            times = list(self._step_times)
            return ExecutorStats(
                queued=sum(len(q) for q in self._queues.values()),
                running_jobs=len(self._running),
                batch_size=self._batch_size,
                max_batch=self.max_batch,
                steps_per_second=len(times) / sum(times) if times and sum(times) > 0 else 0.0,
                completed=self._completed,
                failed=self._failed,
                paused=self._paused,
            )

    def queued_jobs(self) -> list[Job]:
        """Queued jobs in the order they will start."""
        with self._lock:
            return self._order()

    def running_jobs(self) -> list[Job]:
        with self._lock:
            return [r.job for r in self._running]

    def pause(self, paused: bool = True) -> None:
        """A paused executor finishes what runs and starts nothing new."""
        with self._lock:
            self._paused = paused
            self._lock.notify()

    async def shutdown(self) -> None:
        """Finish the current step, fail everything else with a reason, and join the worker."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        await asyncio.to_thread(self._thread.join)

    # ---- queue bookkeeping (caller holds the lock) ---------------------------------------------------

    def _order(self) -> list[Job]:
        """Queued jobs in start order: owners take turns, starting with the owner at the front."""
        lanes = [list(q) for q in self._queues.values()]
        return [job for rank in itertools.zip_longest(*lanes) for job in rank if job is not None]

    def _announce_positions(self) -> None:
        order = self._order()
        for position, job in enumerate(order, 1):
            if job.position != position:
                job.position = position
                job._emit(Queued(position, len(order)))

    def _pop_next(self) -> Job | None:
        while self._queues:
            owner, lane = next(iter(self._queues.items()))
            job = lane.popleft()
            del self._queues[owner]
            if lane:
                self._queues[owner] = lane  # back of the line
            if not job.cancel_requested:
                return job
        return None

    def _cancel_queued(self, job: Job) -> None:
        with self._lock:
            lane = self._queues.get(job.owner)
            if lane is None or job not in lane:
                return  # running or finished: the worker handles it between steps
            lane.remove(job)
            if not lane:
                del self._queues[job.owner]
            job._emit(JobCancelled())
            self._announce_positions()

    # ---- worker thread -------------------------------------------------------------------------------

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stopping and not self._running and (self._paused or not self._queues):
                    self._lock.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            for job in admitted:
                self._start(job)
            self._drop_cancelled_and_late()
            if self._running:
                self._step()
                self._finish_done()
        self._fail_everything(ShuttingDown("The bot shut down before this request finished: please send it again."))

    def _admit(self) -> list[Job]:
        """Take queued jobs while the batch has room; a job runs whole, so an empty batch takes any job."""
        admitted: list[Job] = []
        images = sum(len(r.samples) for r in self._running)
        while self._queues and not self._paused:
            front = next(iter(self._queues.values()))[0]
            if (images or admitted) and images + front.request.count > self.max_batch:
                break
            job = self._pop_next()
            if job is None:
                break
            images += job.request.count
            admitted.append(job)
        if admitted:
            self._announce_positions()
        return admitted

    def _start(self, job: Job) -> None:
        started = time.monotonic()
        try:
            plan = prepare(self.model, job.request)
        except Exception as exc:
            self._fail(job, exc)
            return
        plan.timings["queued"] = started - job.submitted_at
        with self._lock:
            self._running.append(_Running(job, plan))
            batch = sum(len(r.samples) for r in self._running)
        job._emit(Started(batch))

    def _drop_cancelled_and_late(self) -> None:
        now = time.monotonic()
        for running in list(self._running):
            if running.job.cancel_requested:
                self._remove(running)
                running.job._emit(JobCancelled())
            elif now - running.started_at > self.config.job_timeout:
                self._remove(running)
                self._fail(running.job, JobTimeout(f"The request ran longer than {self.config.job_timeout:g} s."))

    def _step(self) -> None:
        """One denoising step for every running image, isolating faults to the job that caused them."""
        started = time.perf_counter()
        running = list(self._running)
        predictions = self._predict(running)
        if isinstance(predictions, Exception):  # the batch failed as a whole: retry each job alone, once
            self._free_memory()
            for r in running:
                alone = self._predict([r])
                if isinstance(alone, Exception):
                    self._remove(r)
                    self._fail(r.job, alone)
                    if isinstance(alone, OutOfMemory) and self.max_batch > 1:
                        self.max_batch = max(1, len(running) - 1)  # learn what fits
                else:
                    self._advance(r, alone[0])
        else:
            for r, noise in zip(running, predictions, strict=True):
                self._advance(r, noise)
        with self._lock:
            self._batch_size = sum(len(r.samples) for r in running)
            self._step_times.append(time.perf_counter() - started)

    def _predict(self, running: list[_Running]) -> list[list[torch.Tensor]] | Exception:
        """Noise predictions grouped per job, or the error that stopped them. Changes no state."""
        samples = [s for r in running for s in r.samples]
        out_of_memory = False
        try:
            flat = predict_noise(self.model, samples)
        except torch.OutOfMemoryError:
            out_of_memory = True  # handled outside the except block, so the traceback frees its tensors
        except Exception as exc:
            log.exception("UNet step failed for jobs %s", [r.job.id for r in running])
            return exc
        if out_of_memory:
            return OutOfMemory("The GPU ran out of memory for this request: lower the size or count.")
        grouped, start = [], 0
        for r in running:
            grouped.append(flat[start : start + len(r.samples)])
            start += len(r.samples)
        return grouped

    def _advance(self, running: _Running, predictions: list[torch.Tensor]) -> None:
        try:
            for sample, noise in zip(running.samples, predictions, strict=True):
                advance(sample, noise)
        except Exception as exc:
            log.exception("scheduler step failed for job %s", running.job.id)
            self._remove(running)
            self._fail(running.job, exc)
            return
        sample = running.samples[0]
        show = sample.step % self.config.preview_every == 0 or sample.done
        running.job._emit(Step(sample.step, sample.total, preview(sample) if show else None))

    def _finish_done(self) -> None:
        done = [r for r in self._running if r.samples[0].done]
        if not done:
            return
        for r in done:
            self._remove(r)
        # Decode finished jobs of one latent size together.
        by_shape: dict[tuple[int, ...], list[_Running]] = {}
        for r in done:
            by_shape.setdefault(tuple(r.samples[0].latents.shape), []).append(r)
        for group in by_shape.values():
            for r, images in self._decode(group):
                if isinstance(images, Exception):
                    self._fail(r.job, images)
                    continue
                r.plan.timings["denoise+decode"] = time.monotonic() - r.started_at
                try:
                    result = finish(self.model, r.plan, images)
                except Exception as exc:
                    self._fail(r.job, exc)
                    continue
                with self._lock:
                    self._completed += 1
                r.job._emit(Done(result))

    def _decode(self, group: list[_Running]) -> list[tuple[_Running, list[Image.Image] | Exception]]:
        samples = [s for r in group for s in r.samples]
        try:
            images = decode(self.model, samples)
        except Exception as exc:
            if len(group) == 1:
                return [(group[0], exc)]
            self._free_memory()
            return [pair for r in group for pair in self._decode([r])]
        out: list[tuple[_Running, list[Image.Image] | Exception]] = []
        start = 0
        for r in group:
            out.append((r, list(images[start : start + len(r.samples)])))
            start += len(r.samples)
        return out

    def _remove(self, running: _Running) -> None:
        with self._lock:
            if running in self._running:
                self._running.remove(running)

    def _fail(self, job: Job, error: BaseException) -> None:
        if not isinstance(error, SDEngineError):
            error = SDEngineError(f"The generator hit an internal error ({type(error).__name__}): try again.")
        with self._lock:
            self._failed += 1
        job._emit(Failed(error))

    def _fail_everything(self, error: SDEngineError) -> None:
        with self._lock:
            jobs = [r.job for r in self._running] + [j for q in self._queues.values() for j in q]
            self._running.clear()
            self._queues.clear()
        for job in jobs:
            self._fail(job, error)

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
