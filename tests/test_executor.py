"""The executor: fairness, caps, cancellation, continuous batching, fault isolation and shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine.executor
from sdengine import Cancelled, GenerationRequest, InvalidRequest, Model, OutOfMemory, generate
from sdengine.executor import (
    Done,
    Executor,
    ExecutorConfig,
    Failed,
    Job,
    JobCancelled,
    JobTimeout,
    QueueFull,
    ShuttingDown,
    Started,
    Step,
)


def request(prompt: str = "a lighthouse", **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt, **{"steps": 3, "seed": 5, **kwargs})


async def started_order(jobs: list[Job]) -> list[Job]:
    """Jobs sorted by when the worker started them, read from their event streams."""
    started: dict[int, float] = {}

    async def watch(job: Job) -> None:
        async for event in job.events():
            if isinstance(event, Started):
                started[job.id] = time.monotonic()

    await asyncio.gather(*(watch(job) for job in jobs))
    return sorted(jobs, key=lambda job: started[job.id])


class FaultyUNet(torch.nn.Module):
    """Wraps the real UNet and raises `error` for inputs that `poisoned` selects: an injected fake."""

    def __init__(self, unet: torch.nn.Module, poisoned: Callable[[torch.Tensor], bool], error: Exception) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.poisoned = poisoned
        self.error = error
        self.calls: list[int] = []  # batch rows of every call

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(sample.shape[0])
        if self.poisoned(sample):
            raise self.error
        return self.unet(sample, *args, **kwargs)


def with_unet(model: Model, unet: torch.nn.Module) -> Model:
    return dataclasses.replace(model, unet=unet)


async def test_owners_take_turns(tiny: Model) -> None:
    executor = Executor(tiny, ExecutorConfig(max_batch=1, max_pending_per_owner=10))
    executor.pause()
    heavy = [executor.submit(request(f"heavy {i}"), owner="heavy") for i in range(4)]
    light = executor.submit(request("light"), owner="light")
    assert light.position == 2  # right after heavy's first job, not after all four
    executor.pause(False)
    order = await started_order([*heavy, light])
    assert [job.owner for job in order] == ["heavy", "light", "heavy", "heavy", "heavy"]
    await executor.shutdown()


async def test_caps_reject_at_once_with_position_and_length(tiny: Model) -> None:
    executor = Executor(tiny, ExecutorConfig(max_batch=1, max_pending_per_owner=2, max_queued=3))
    executor.pause()
    executor.submit(request(), owner="a")
    executor.submit(request(), owner="a")
    with pytest.raises(QueueFull, match="limit is 2") as owner_full:
        executor.submit(request(), owner="a")
    assert (owner_full.value.position, owner_full.value.length) == (1, 2)
    executor.submit(request(), owner="b")
    with pytest.raises(QueueFull, match="queue is full") as global_full:
        executor.submit(request(), owner="c")
    assert global_full.value.length == 3
    await executor.shutdown()


async def test_cancel_queued_and_running(tiny: Model) -> None:
    executor = Executor(tiny, ExecutorConfig(max_batch=1))
    running = executor.submit(request(steps=150), owner="a")
    queued = executor.submit(request(), owner="b")
    queued.cancel()
    with pytest.raises(Cancelled):
        await queued.result()
    async for event in running.events():
        if isinstance(event, Step):
            running.cancel()
            break
    with pytest.raises(Cancelled):
        await running.result()
    # The worker keeps serving after both cancellations.
    result = await executor.submit(request(), owner="c").result()
    assert result.seeds == [5]
    await executor.shutdown()


async def test_batched_pixels_equal_solo_pixels(tiny: Model) -> None:
    """Mixed schedulers, step counts, guidance and modes share UNet calls and still match solo runs."""
    init = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init, "PNG")
    requests = [
        request("a red car", scheduler="dpmpp_2m", steps=6, guidance=7.5, seed=1),
        request("a blue boat", scheduler="euler_a", steps=4, guidance=3.0, seed=2, count=2),
        request("a green tree", scheduler="lms", steps=5, guidance=1.0, seed=3),
        request("a house", scheduler="ddim", steps=8, seed=4, image=init.getvalue(), strength=0.5),
    ]
    counting = FaultyUNet(tiny.unet, lambda _: False, RuntimeError())
    executor = Executor(with_unet(tiny, counting), ExecutorConfig(max_batch=8))
    executor.pause()
    jobs = [executor.submit(r, owner=f"user{i}") for i, r in enumerate(requests)]
    executor.pause(False)
    batched = [await job.result() for job in jobs]
    await executor.shutdown()

    assert max(counting.calls) >= 8, "the four requests never shared a UNet call"
    for req, result in zip(requests, batched, strict=True):
        solo = generate(tiny, req)
        assert result.seeds == solo.seeds
        for a, b in zip(result.images, solo.images, strict=True):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


async def test_a_failing_request_fails_alone(tiny: Model) -> None:
    poison_width = 48  # latent width 24 for the tiny model: only the poisoned request has it
    unet = FaultyUNet(tiny.unet, lambda x: x.shape[-1] == poison_width // 2, RuntimeError("boom"))
    executor = Executor(with_unet(tiny, unet), ExecutorConfig(max_batch=8))
    executor.pause()
    good = [executor.submit(request(f"ok {i}"), owner=f"u{i}") for i in range(2)]
    bad = executor.submit(request("bad", width=poison_width), owner="evil")
    bad_input = executor.submit(request("bad image", image=b"not an image"), owner="u9")
    executor.pause(False)
    for job in good:
        assert (await job.result()).seeds == [5]
    with pytest.raises(Exception, match="internal error"):
        await bad.result()
    with pytest.raises(InvalidRequest, match="not a PNG"):
        await bad_input.result()
    assert executor.stats().failed == 2
    await executor.shutdown()


async def test_out_of_memory_retries_smaller_then_fails_only_what_cannot_fit(tiny: Model) -> None:
    # More than 4 UNet rows (two guided images) "do not fit"; a 96-pixel-wide request never fits.
    def too_big(x: torch.Tensor) -> bool:
        return x.shape[0] > 4 or x.shape[-1] == 48

    unet = FaultyUNet(tiny.unet, too_big, torch.OutOfMemoryError("CUDA out of memory"))
    executor = Executor(with_unet(tiny, unet), ExecutorConfig(max_batch=8))
    executor.pause()
    fits = [executor.submit(request(f"fits {i}"), owner=f"u{i}") for i in range(3)]
    never = executor.submit(request("huge", width=96), owner="big")
    executor.pause(False)
    for job in fits:
        assert (await job.result()).seeds == [5]
    with pytest.raises(OutOfMemory, match="lower the size or count"):
        await never.result()
    assert executor.stats().max_batch < 8
    await executor.shutdown()


async def test_timeout_fails_the_job(tiny: Model) -> None:
    executor = Executor(tiny, ExecutorConfig(job_timeout=0.2))
    with pytest.raises(JobTimeout):
        await executor.submit(request(steps=150), owner="a").result()
    await executor.shutdown()


async def test_shutdown_fails_queued_work_with_a_reason(tiny: Model) -> None:
    executor = Executor(tiny, ExecutorConfig(max_batch=1))
    running = executor.submit(request(steps=150), owner="a")
    queued = [executor.submit(request(), owner=f"u{i}") for i in range(3)]
    async for event in running.events():
        if isinstance(event, Step):
            break
    await executor.shutdown()
    for job in [running, *queued]:
        with pytest.raises(ShuttingDown, match="send it again"):
            await job.result()
    assert not executor._thread.is_alive()
    with pytest.raises(ShuttingDown):
        executor.submit(request(), owner="late")


async def test_events_arrive_in_order_and_the_loop_stays_responsive(tiny: Model) -> None:
    executor = Executor(tiny, ExecutorConfig(preview_every=2))
    job = executor.submit(request(steps=12), owner="a")
    lags: list[float] = []

    async def probe() -> None:
        while not job.finished:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - before - 0.005)

    events, _ = await asyncio.gather(_collect(job), probe())
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] in ("Queued", "Started") and kinds[-1] == "Done"
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.step for s in steps] == list(range(1, 13))
    assert all((s.preview is not None) == (s.step % 2 == 0) for s in steps)
    assert isinstance(events[-1], Done) and len(events[-1].result.pngs) == 1
    # Generous bound: the worker thread must never block the loop for a whole step.
    assert max(lags) < 0.5
    await executor.shutdown()


async def test_pngs_are_made_off_the_worker_thread_and_done_follows_the_last_step(
    tiny: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []

    def finish(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_finish(*args)

    real_finish = sdengine.executor.finish
    monkeypatch.setattr(sdengine.executor, "finish", finish)
    executor = Executor(tiny, ExecutorConfig(max_batch=4))
    jobs = [executor.submit(request(seed=i, steps=2 + i), owner=f"u{i}") for i in range(3)]
    for events in await asyncio.gather(*(_collect(job) for job in jobs)):
        assert isinstance(events[-1], Done) and len(events[-1].result.pngs) == 1
        assert isinstance(events[-2], Step) and events[-2].step == events[-2].total
    assert len(threads) == 3 and all(name.startswith("sdengine-finish") for name in threads), threads
    await executor.shutdown()


async def _collect(job: Job) -> list[object]:
    return [event async for event in job.events()]


async def test_failed_and_cancelled_are_terminal_events(tiny: Model) -> None:
    executor = Executor(tiny)
    job = executor.submit(request(image=b""), owner="a")
    events = await _collect(job)
    assert isinstance(events[-1], Failed) and "empty" in str(events[-1].error)
    executor.pause()
    queued = executor.submit(request(), owner="b")
    queued.cancel()
    assert isinstance((await _collect(queued))[-1], JobCancelled)
    await executor.shutdown()
