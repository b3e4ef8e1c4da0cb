"""Which queued jobs an executor starts between two steps, with one model or a pool of them.

A job whose model is off the device (`max_loaded`) starts once it can be brought there without pushing out a model
that has jobs running. Until then, or while the next job would push out a model that has queued work, jobs of
models on the device go first, but at most `MAX_PASSES` times ahead of it: fair, without swapping models at every
job. The caller holds the executor's lock.
"""

from __future__ import annotations

from .jobs import FairQueue, Job
from .pool import ModelPool

MAX_PASSES = 4  # jobs of models on the device that may start ahead of one whose model must be brought there


class Admission:
    """The start order of `queue`'s jobs on `pool`'s device; see the module docstring."""

    def __init__(self, queue: FairQueue, pool: ModelPool) -> None:
        self.queue = queue
        self.pool = pool
        self._passes: dict[int, int] = {}  # job id -> jobs started ahead of it while its model was away

    def model_name(self, job: Job) -> str:
        return job.request.model or self.pool.default

    def admit(self, images: int, busy: set[str], max_batch: int) -> list[Job]:
        """Take queued jobs while a batch of `images` has room for `max_batch`; a job runs whole, so an empty batch
        takes any job. `busy`: the models of the running jobs."""
        admitted: list[Job] = []
        busy = set(busy)
        while (front := self.queue.front()) is not None:
            job = self._next_job(front, busy)
            if job is None or ((images or admitted) and images + job.request.count > max_batch):
                break
            self.queue.take(job)
            if job is front:
                self._passes.pop(front.id, None)
            else:
                self._passes[front.id] = self._passes.get(front.id, 0) + 1
            images += job.request.count
            admitted.append(job)
            busy.add(self.model_name(job))
            if not self.pool.on_device(self.model_name(job)):
                break  # it is brought to the device when it starts: what else fits is known after that
        if admitted:
            self.queue.announce_positions()
            queued = {job.id for job in self.queue.order()}
            self._passes = {job_id: n for job_id, n in self._passes.items() if job_id in queued}
        return admitted

    def _next_job(self, front: Job, busy: set[str]) -> Job | None:
        """The job to start next: the fair queue's `front`, unless its model is off the device and a job of a model
        on the device may go ahead of it (see the module docstring); None to start nothing now."""
        name = self.model_name(front)
        if self.pool.on_device(name):
            return front
        if self._passes.get(front.id, 0) < MAX_PASSES:
            ready = (job for job in self.queue.order() if self.pool.on_device(self.model_name(job)))
            if (job := next(ready, None)) is not None:
                return job
        if self.pool.has_room_for(name, busy):
            return front
        return None  # its model waits until the running jobs of the one it will push out are done
