"""Several models behind one executor: `max_loaded`, switching, fairness across models, same pixels as solo runs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sdengine import GenerationRequest, InvalidRequest, generate, load_model
from sdengine.admission import MAX_PASSES
from sdengine.executor import Executor, ExecutorConfig, Job, Loading, Started
from sdengine.info import ModelSpec
from sdengine.pool import ModelPool, PoolLoadError

SPECS = {"sd": ModelSpec("tiny", device="cpu", dtype="fp32"), "xl": ModelSpec("tiny-xl", device="cpu", dtype="fp32")}


def request(model: str, seed: int, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest("a lighthouse", steps=2, seed=seed, width=64, height=64, model=model, **kwargs)


async def follow(jobs: list[Job], executor: Executor) -> tuple[list[Job], list[Job], list[int]]:
    """The jobs in start order, the ones that waited for a load, and how many models were on the device at each
    event."""
    started: dict[int, float] = {}
    loading: list[Job] = []
    on_device: list[int] = []

    async def watch(job: Job) -> None:
        async for event in job.events():
            on_device.append(len(executor.stats().loaded))
            if isinstance(event, Started):
                started[job.id] = time.monotonic()
            elif isinstance(event, Loading):
                assert event.model == job.request.model
                loading.append(job)

    await asyncio.gather(*(watch(job) for job in jobs))
    return sorted(jobs, key=lambda job: started[job.id]), loading, on_device


async def submit_paused(executor: Executor, requests: list[GenerationRequest]) -> list[Job]:
    """Queue everything first (one owner each, so fair order is submit order), then let the worker go."""
    executor.pause()
    jobs = [executor.submit(r, owner=f"user{i}") for i, r in enumerate(requests)]
    executor.pause(False)
    return jobs


@pytest.fixture(scope="module")
def solo() -> dict[str, Any]:
    return {name: load_model(spec.path, device="cpu", dtype="fp32") for name, spec in SPECS.items()}


def test_a_pool_loads_every_model_and_keeps_the_default_on_the_device() -> None:
    pool = ModelPool.load(SPECS, default="xl", max_loaded=1)
    assert pool.loaded == ["xl"] and pool.names == ["sd", "xl"]
    assert (pool.infos["sd"].kind, pool.infos["xl"].kind) == ("sd1", "sdxl")
    with pytest.raises(InvalidRequest, match="There is no model 'sdxl' here: pick one of sd, xl"):
        pool.resolve("sdxl")
    with pytest.raises(PoolLoadError) as failed:
        ModelPool.load({**SPECS, "broken": ModelSpec("/no/such/model")}, default="sd")
    assert (failed.value.name, failed.value.path) == ("broken", "/no/such/model")


async def test_a_switch_respects_max_loaded_and_gives_solo_pixels(solo: dict[str, Any]) -> None:
    executor = Executor(ModelPool.load(SPECS, default="sd", max_loaded=1), ExecutorConfig(max_batch=1))
    try:
        requests = [request("xl", 1), request("sd", 2), request("xl", 3)]
        jobs = await submit_paused(executor, requests)
        _, loading, on_device = await follow(jobs, executor)
        assert max(on_device) == 1  # never two models on the device
        assert loading  # "xl" was unloaded at the start, so its first job waited for it
        for job in jobs:  # an unloaded and reloaded model draws the same pictures as a model never unloaded
            want = generate(solo[job.request.model], job.request).pngs
            assert (await job.result()).pngs == want
        with pytest.raises(InvalidRequest, match="no model 'nope'"):
            executor.submit(request("nope", 1), owner="user0")
    finally:
        await executor.shutdown()


async def test_jobs_of_the_loaded_model_go_first_at_most_max_passes_times() -> None:
    """Alternating models would swap at every job; jobs of the model on the device go ahead of one whose model is
    away, but never more than MAX_PASSES of them."""
    executor = Executor(ModelPool.load(SPECS, default="sd", max_loaded=1), ExecutorConfig(max_batch=1))
    try:
        alternating = [request("sd" if i % 2 == 0 else "xl", i) for i in range(6)]
        order, loading, _ = await follow(await submit_paused(executor, alternating), executor)
        assert [job.request.model for job in order] == ["sd"] * 3 + ["xl"] * 3
        assert len(loading) == 1  # one switch instead of five

        starved = [request("xl", 0)] + [request("sd", i) for i in range(1, MAX_PASSES + 3)]
        jobs = await submit_paused(executor, starved)
        order, _, _ = await follow(jobs, executor)
        assert order.index(jobs[0]) <= MAX_PASSES  # passed over at most MAX_PASSES times
    finally:
        await executor.shutdown()


async def test_two_models_on_the_device_run_together_without_sharing_a_unet_call(solo: dict[str, Any]) -> None:
    """With both loaded and room for both, their jobs run at once, and each model's UNet sees only its own rows
    (the SDXL-shaped UNet would reject SD 1.x embeddings)."""
    executor = Executor(ModelPool.load(SPECS, default="sd"), ExecutorConfig(max_batch=4))
    try:
        jobs = await submit_paused(executor, [request("sd", 7), request("xl", 7)])
        _, loading, on_device = await follow(jobs, executor)
        assert not loading and max(on_device) == 2
        for job in jobs:
            assert (await job.result()).pngs == generate(solo[job.request.model], job.request).pngs
    finally:
        await executor.shutdown()
