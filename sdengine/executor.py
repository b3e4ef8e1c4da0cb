"""One worker thread per device that serves many owners fairly and batches their UNet steps together.

The asyncio side only ever calls `submit`, `Job.events`, `Job.result`, `Job.cancel`, `stats` and
`shutdown`; every torch call happens on the worker thread, and events cross back to the event loop with
`loop.call_soon_threadsafe`. The torch-free types (errors, config, events, stats, `Job`) live in
`sdengine.jobs` and are re-exported here.

Scheduling, in short:
- Queued jobs wait in one deque per owner; owners take turns (round-robin), so an owner with ten jobs
  delays an owner with one by at most one job.
- Between two steps the worker admits queued jobs while the batch has room (`max_batch` images), and
  drops finished, cancelled or timed-out ones. All running images then share UNet calls of at most
  `max_batch` images of one model and latent shape, each at its own timestep with its own scheduler
  (continuous batching).
- Several models (a `ModelPool`): jobs of models on the device may go ahead of one whose model must be brought
  there, a few times at most (sdengine.admission).

Faults:
- A UNet call that runs out of memory lowers `max_batch` below the images it held and is retried in smaller
  calls (sdengine.device_calls); after `probe_after_steps` full steps without one, `max_batch` tries one image
  more, up to the configured ceiling. Any other failed call is retried image by image, so only the culprit's job
  fails.
- The worker is supervised: an unexpected exception fails the jobs running at that moment and the worker
  goes on. After `MAX_CRASHES` crashes in a row with no step done in between, or if the thread dies, the
  executor is down: queued jobs fail, `submit` raises `ExecutorDown` and `stats().down` says so.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from .admission import Admission
from .batching import default_max_batch
from .device_calls import DeviceCalls, engine_error
from .errors import OutOfMemory, SDEngineError
from .hires import upscale
from .jobs import (
    BatchLimit,
    Done,
    Event,
    ExecutorConfig,
    ExecutorDown,
    ExecutorStats,
    Failed,
    FairQueue,
    Job,
    JobCancelled,
    JobTimeout,
    Loading,
    Queued,
    QueueFull,
    ShuttingDown,
    Started,
    Step,
)
from .models import Model
from .pipeline import advance, finish, prepare, preview
from .pool import ModelPool
from .request import GenerationRequest
from .sampling import Plan, Sample

__all__ = [
    "MAX_CRASHES",
    "Done",
    "Event",
    "Executor",
    "ExecutorConfig",
    "ExecutorDown",
    "ExecutorStats",
    "Failed",
    "Job",
    "JobCancelled",
    "JobTimeout",
    "QueueFull",
    "Queued",
    "ShuttingDown",
    "Started",
    "Step",
]

log = logging.getLogger(__name__)

MAX_CRASHES = 3  # worker crashes in a row, with no step done in between, before the executor gives up
DOWN_MESSAGE = "The generator has stopped working: an admin must restart the bot."


@dataclass
class _Running:
    job: Job
    model: Model
    plan: Plan
    started_at: float = field(default_factory=time.monotonic)

    @property
    def samples(self) -> list[Sample]:
        return self.plan.samples


class Executor:
    """Owns `models` (one model, or a pool of them) on its own worker thread; see the module docstring for the
    scheduling rules."""

    def __init__(self, models: Model | ModelPool, config: ExecutorConfig | None = None) -> None:
        self.pool = models if isinstance(models, ModelPool) else ModelPool.of(models)
        self.config = config or ExecutorConfig()
        self.device = self.pool.device
        ceiling = self.config.max_batch or default_max_batch(self.device, list(self.pool.infos.values()))
        self._calls = DeviceCalls(self.device, BatchLimit(ceiling, self.config.probe_after_steps))
        self._lock = threading.Condition()
        self._queue = FairQueue()
        self._starting: deque[Job] = deque()  # admitted, not yet running: a crash must not lose them
        self._running: list[_Running] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self._paused = False
        self._down_reason = ""
        self._completed = 0
        self._failed = 0
        self._batch_size = 0
        self._step_times: deque[float] = deque(maxlen=20)
        self._admission = Admission(self._queue, self.pool)
        # PNG encoding, infotext and the safety check of finished jobs run here, so that the worker thread does GPU
        # work only and the next step starts at once (at 8 images/s, PNGs alone would stall the GPU).
        self._finisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdengine-finish")
        self._thread = threading.Thread(target=self._work, name=f"sdengine-{self.device}", daemon=True)
        self._thread.start()

    @property
    def max_batch(self) -> int:
        """Images per UNet call, as learned from out-of-memory errors."""
        return self._calls.limit.value

    # ---- asyncio side -------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, owner: str) -> Job:
        """Queue a request, or raise `QueueFull`/`ShuttingDown`/`ExecutorDown`, or `InvalidRequest` for a model
        it does not have, at once."""
        request = replace(request, model=self.pool.resolve(request.model))
        with self._lock:
            if self._down():
                raise ExecutorDown(DOWN_MESSAGE)
            if self._stopping:
                raise ShuttingDown("The generator is shutting down: try again in a minute.")
            self._queue.check_room(owner, sum(r.job.owner == owner for r in self._running), self.config)
            job = Job(next(self._ids), owner, request, self._cancel_queued)
            self._queue.push(job)
            self._queue.announce_positions()
            self._lock.notify()
        return job

    def stats(self) -> ExecutorStats:
        with self._lock:
            times = list(self._step_times)
            reason = self._down()
            return ExecutorStats(
                queued=len(self._queue),
                running_jobs=len(self._running),
                batch_size=self._batch_size,
                max_batch=self.max_batch,
                steps_per_second=len(times) / sum(times) if times and sum(times) > 0 else 0.0,
                completed=self._completed,
                failed=self._failed,
                paused=self._paused,
                down=bool(reason),
                down_reason=reason,
                loaded=tuple(self.pool.loaded),
            )

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

    def _down(self) -> str:
        """Why the executor is down, or "" while it serves. The caller holds the lock."""
        if self._down_reason or self._stopping or self._thread.is_alive():
            return self._down_reason
        return "the worker thread died"

    def _cancel_queued(self, job: Job) -> None:
        with self._lock:
            self._queue.cancel(job)  # False if running or finished: the worker handles it between steps

    # ---- worker thread: supervision ------------------------------------------------------------------

    def _work(self) -> None:
        """Serve until shutdown. A crash fails the jobs it touched; `MAX_CRASHES` in a row end the worker."""
        torch.set_grad_enabled(False)
        crashes = 0
        reason = "the worker thread stopped unexpectedly"
        try:
            while True:
                try:
                    stepped = self._serve_once()
                except Exception as exc:
                    crashes += 1
                    log.exception("executor worker crashed (%d in a row); failing the jobs it was running", crashes)
                    self._fail_touched(
                        f"The generator hit an unexpected error ({type(exc).__name__}) while running this "
                        "request: try again."
                    )
                    if crashes >= MAX_CRASHES:
                        reason = f"{crashes} crashes in a row, the last {type(exc).__name__}: {exc}"
                        return
                    continue
                if stepped is None:
                    return
                if stepped:
                    crashes = 0
        finally:
            self._finisher.shutdown(wait=True)  # finished jobs still get their Done
            if self._stopping:
                self._fail_everything(
                    ShuttingDown, "The bot shut down before this request finished: please send it again."
                )
            else:
                with self._lock:
                    self._down_reason = reason
                log.critical("executor is down (%s): every request fails until the bot restarts", reason)
                self._fail_everything(ExecutorDown, DOWN_MESSAGE)

    def _serve_once(self) -> bool | None:
        """Admit, start and step once. Returns None when stopping, else whether a step ran."""
        with self._lock:
            while not self._stopping and not self._running and (self._paused or not self._queue):
                self._lock.wait()
            if self._stopping:
                return None
            self._starting.extend(self._admit())
        while self._starting:
            self._start(self._starting[0])
            with self._lock:
                self._starting.popleft()
        self._drop_cancelled_and_late()
        if not self._running:
            return False
        self._step()
        self._finish_done()
        return True

    def _fail_touched(self, message: str) -> None:
        """Fail the running and starting jobs after a crash: their state is unknown."""
        with self._lock:
            jobs = [r.job for r in self._running]
            jobs += [job for job in self._starting if job not in jobs]
            self._running.clear()
            self._starting.clear()
        for job in jobs:
            self._fail(job, SDEngineError(message))

    def _fail_everything(self, error: type[ShuttingDown], message: str) -> None:
        with self._lock:
            jobs = [r.job for r in self._running] + list(self._starting) + self._queue.clear()
            self._running.clear()
            self._starting.clear()
        for job in jobs:
            self._fail(job, error(message))

    # ---- worker thread: jobs -------------------------------------------------------------------------

    def _admit(self) -> list[Job]:
        if self._paused:
            return []
        images = sum(len(r.samples) for r in self._running)
        return self._admission.admit(images, {self._model_name(r.job) for r in self._running}, self.max_batch)

    def _model_name(self, job: Job) -> str:
        return self._admission.model_name(job)

    def _start(self, job: Job) -> None:
        started = time.monotonic()
        name = self._model_name(job)
        try:
            if not self.pool.on_device(name):
                job._emit(Loading(name))
                with self._lock:
                    busy = {self._model_name(r.job) for r in self._running}
                model = self.pool.acquire(name, busy)
                started = time.monotonic()  # the load is not the job's own time
            else:
                model = self.pool.acquire(name, set())
            plan = prepare(model, job.request)
        except Exception as exc:
            self._fail(job, exc)
            return
        plan.timings["queued"] = started - job.submitted_at
        with self._lock:
            self._running.append(_Running(job, model, plan))
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
        """One denoising step for every running image, failing only the jobs whose images failed."""
        started = time.perf_counter()
        running = list(self._running)
        ooms = self._calls.limit.ooms
        predictions: dict[int, torch.Tensor | Exception] = {}
        for model in {id(r.model): r.model for r in running}.values():  # never two models in one UNet call
            predictions |= self._calls.predict_all(model, [s for r in running if r.model is model for s in r.samples])
        for r in running:
            noise = [predictions[id(s)] for s in r.samples]
            error = next((n for n in noise if isinstance(n, Exception)), None)
            if error is not None:
                self._remove(r)
                self._fail(r.job, error)
            else:
                self._advance(r, [n for n in noise if isinstance(n, torch.Tensor)])
        images = sum(len(r.samples) for r in running)
        if self._calls.limit.ooms == ooms:
            self._calls.limit.quiet_step(images)
        with self._lock:
            self._batch_size = images
            self._step_times.append(time.perf_counter() - started)

    def _advance(self, running: _Running, predictions: list[torch.Tensor]) -> None:
        try:
            for sample, noise in zip(running.samples, predictions, strict=True):
                advance(sample, noise)
        except Exception as exc:
            self._remove(running)
            self._fail(running.job, exc)
            return
        step, total = running.plan.progress()
        show = step % self.config.preview_every == 0 or step == total
        # Outside the try: the preview copies to the host, where CUDA reports errors of earlier kernels, which
        # concern the device rather than this job; the supervisor in `_work` handles them.
        running.job._emit(Step(step, total, preview(running.samples[0]) if show else None))

    def _finish_done(self) -> None:
        done = [r for r in self._running if r.samples[0].done and not self._starts_hires_pass(r)]
        if not done:
            return
        for r in done:
            self._remove(r)
        # Decode finished jobs of one model and latent size together.
        by_shape: dict[tuple[int, ...], list[_Running]] = {}
        for r in done:
            by_shape.setdefault((id(r.model), *r.samples[0].latents.shape), []).append(r)
        for group in by_shape.values():
            decoded = self._calls.decode_groups(group[0].model, [r.samples for r in group])
            for r, images in zip(group, decoded, strict=True):
                if isinstance(images, Exception):
                    self._fail(r.job, images)
                    continue
                r.plan.timings["denoise+decode"] = time.monotonic() - r.started_at
                self._finisher.submit(self._finish, r, images)

    def _starts_hires_pass(self, r: _Running) -> bool:
        """For a job whose pass just ended: start its hires pass, if it has one still to come. True when it did, or
        when the upscale failed the job: either way the job is not done."""
        if not r.plan.hires_steps:
            return False
        try:
            upscale(r.model, r.plan)
        except Exception as exc:
            self._remove(r)
            self._fail(r.job, exc)
        return True

    def _finish(self, r: _Running, images: list[Image.Image]) -> None:
        """On the finisher pool: PNGs with their parameters, the safety check, then Done (after the job's last Step,
        which the worker emitted before decoding)."""
        try:
            result = finish(r.model, r.plan, images)
        except Exception as exc:
            self._fail(r.job, exc)
            return
        with self._lock:
            self._completed += 1
        r.job._emit(Done(result))

    def _remove(self, running: _Running) -> None:
        with self._lock:
            if running in self._running:
                self._running.remove(running)

    def _fail(self, job: Job, error: BaseException) -> None:
        reported = engine_error(error)
        if isinstance(reported, OutOfMemory):
            log.warning("job %s ran out of memory", job.id)
        elif reported is not error:
            log.error("job %s failed", job.id, exc_info=error)
        with self._lock:
            self._failed += 1
        job._emit(Failed(reported))
