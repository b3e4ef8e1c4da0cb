"""The Ray backend on a local Ray cluster started once for this module: 2 CPU workers with the tiny model.

Every wait is on an event or a state, with a generous ceiling: CI shares its 2 cores with other work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
from PIL import Image

import sdengine
from bot.app import SDBot
from bot.config import ExecutorSettings, RaySettings
from sdengine import Cancelled, GenerationRequest, Model
from sdengine.jobs import (
    Done,
    Event,
    ExecutorConfig,
    ExecutorDown,
    Failed,
    Job,
    JobCancelled,
    Queued,
    Retried,
    Started,
    Step,
)
from tests.botharness import COMMANDS, Harness, fake_fixture, harness_fixture, pixels, result_id
from tests.fakediscord import run_client

ray = pytest.importorskip("ray")

# Ray starts its workers at niceness 15, so that its own daemons stay responsive. On a CI machine shared with other
# work, that lets any busy process at the normal priority starve the workers for minutes (a worker restart under two
# busy loops took over 3 minutes): the clusters these tests start run their workers at the normal priority.
os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112  (Ray reads this exact name)

from sdengine.ray_cluster import Cluster, start_cluster  # noqa: E402  (needs ray)
from sdengine.ray_executor import RayExecutor  # noqa: E402
from sdengine.ray_worker import ModelSpec, Worker  # noqa: E402

__all__ = ["fake_fixture", "harness_fixture"]

pytestmark = pytest.mark.timeout(600)

CEILING = 180.0  # seconds: the longest any wait below may take before the test fails
CONFIG = ExecutorConfig(max_pending_per_owner=20, max_queued=50)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    # 3 CPUs: the 2 workers every test shares, and 1 for the cluster of the "no worker alive" test.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_session: None) -> Iterator[Cluster]:
    workers = start_cluster("local", 2, 0, ModelSpec("tiny"), CONFIG)
    try:
        yield workers
    finally:
        workers.close()


@pytest_asyncio.fixture
async def executor(cluster: Cluster) -> AsyncIterator[RayExecutor]:
    ex = RayExecutor(cluster, CONFIG, poll_wait=2.0)
    await until(lambda: ex.stats().workers == 2, "both workers alive")  # a test before may have killed one
    try:
        yield ex
    finally:
        await ex.shutdown()


@pytest.fixture
def workers_threads() -> Iterator[None]:
    """This process computes with the intra-op threads of a worker, 1 per CPU Ray gives it: on a CPU, the thread count
    changes float sums, and so a few pixels by 1/255 (a GPU's pixels do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


async def until(condition: Callable[[], bool], what: str, timeout: float = CEILING) -> None:
    """Wait for a state: checked every 50 ms, failing after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"never happened within {timeout:g} s: {what}"
        await asyncio.sleep(0.05)


async def events_of(job: Job) -> list[Event]:
    return [event async for event in job.events()]


async def first(job: Job, kind: type[Any]) -> list[Event]:
    """The job's events up to and including its first `kind`."""
    seen: list[Event] = []
    async with asyncio.timeout(CEILING):
        async for event in job.events():
            seen.append(event)
            if isinstance(event, kind):
                return seen
    raise AssertionError(f"job {job.id} ended without {kind.__name__}: {seen}")


def init_png() -> bytes:
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, "PNG")
    return buffer.getvalue()


def request(seed: int, *, steps: int = 2, **options: Any) -> GenerationRequest:
    return GenerationRequest("a red fox", seed=seed, steps=steps, width=64, height=64, **options)


def same_pixels(result: sdengine.GenerationResult, reference: sdengine.GenerationResult) -> bool:
    return len(result.pngs) == len(reference.pngs) and all(
        np.array_equal(pixels(a), pixels(b)) for a, b in zip(result.pngs, reference.pngs, strict=True)
    )


# ---- scheduling ----------------------------------------------------------------------------------------------


async def test_concurrent_jobs_spread_over_both_workers(executor: RayExecutor) -> None:
    first_job = executor.submit(request(1, steps=20), "alice")
    second_job = executor.submit(request(2, steps=20), "bob")
    third = executor.submit(request(3), "carol")
    # Each worker has room for one image (a CPU worker runs solo): one job each, the third waits in the bot's queue.
    pids = {executor.worker_of(first_job), executor.worker_of(second_job)}
    assert pids == {r.pid for r in executor.cluster.ready}
    assert executor.worker_of(third) is None and executor.stats().queued == 1
    ends = await asyncio.wait_for(asyncio.gather(*(events_of(j) for j in (first_job, second_job, third))), CEILING)
    assert all(isinstance(events[-1], Done) for events in ends), ends
    assert ends[2][0] == Queued(1, 1)
    stats = executor.stats()
    assert (stats.completed, stats.running_jobs, stats.queued, stats.workers) == (3, 0, 0, 2)


async def test_owners_take_turns_across_workers(executor: RayExecutor, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sdengine.ray_executor")
    executor.pause()
    jobs = {name: executor.submit(request(i), name[0]) for i, name in enumerate(["a1", "a2", "a3", "b1", "b2"])}
    assert [jobs[n].position for n in ("a1", "b1", "a2", "b2", "a3")] == [1, 2, 3, 4, 5]
    executor.pause(False)
    await asyncio.wait_for(asyncio.gather(*(j.result() for j in jobs.values())), CEILING)
    names = {job.id: name for name, job in jobs.items()}
    dispatched = [
        names[int(m[1])]
        for r in caplog.records
        if (m := re.match(r"job (\d+) of \w+ to worker", r.getMessage())) and int(m[1]) in names
    ]
    assert dispatched == ["a1", "b1", "a2", "b2", "a3"]


# ---- same pixels as the local backend ----------------------------------------------------------------------


@pytest.mark.usefixtures("workers_threads")
async def test_same_pixels_as_the_local_backend(executor: RayExecutor, tiny: Model) -> None:
    requests = [
        request(10 + i, scheduler=scheduler, **init)
        for i, scheduler in enumerate(sdengine.SCHEDULERS)
        for init in ({}, {"image": init_png(), "strength": 0.6})
    ]
    jobs = [executor.submit(r, f"user{i % 3}") for i, r in enumerate(requests)]
    results = await asyncio.wait_for(asyncio.gather(*(j.result() for j in jobs)), CEILING)
    for req, result in zip(requests, results, strict=True):
        reference = await asyncio.to_thread(sdengine.generate, tiny, req)
        assert same_pixels(result, reference), (req.scheduler, req.image is not None)


# ---- faults --------------------------------------------------------------------------------------------------


async def test_a_poll_reply_nobody_reads_loses_no_event() -> None:
    """An executor that stops leaves its last poll running in the worker, which Ray does not cancel; the events
    that poll takes must reach the next executor's polls too. In this process, without Ray: the actor class."""
    worker = Worker(ModelSpec("tiny"), CONFIG)
    await worker.submit(7, request(3), "alice")
    unread = await worker.poll(CEILING)  # the stopped executor's poll: its reply goes nowhere
    assert unread.events
    received: list[Event] = []
    seen = 0  # the next executor starts from nothing
    async with asyncio.timeout(CEILING):
        while not received or not isinstance(received[-1], Done):
            report = await worker.poll(CEILING, seen)
            received += [event for key, event in report.events if key == 7]
            seen = report.last
    assert [type(e) for e in received] == [Started, Step, Step, Done]
    assert received[: len(unread.events)] == [event for _, event in unread.events]
    assert (await worker.poll(0.0, seen)).events == []  # acknowledged: gone


@pytest.mark.usefixtures("workers_threads")
async def test_a_killed_worker_s_job_runs_again_elsewhere_with_the_same_pixels(
    executor: RayExecutor, tiny: Model
) -> None:
    req = request(42, steps=30)
    job = executor.submit(req, "alice")
    events = await first(job, Step)  # running on its worker
    pid = executor.worker_of(job)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    events += await asyncio.wait_for(events_of(job), CEILING)
    retried = [e for e in events if isinstance(e, Retried)]
    assert len(retried) == 1 and retried[0].attempt == 2, events
    after = events[events.index(retried[0]) :]
    names = [f"{type(e).__module__}.{type(e).__name__}" for e in events]
    assert any(isinstance(e, Started) for e in after) and isinstance(events[-1], Done), (names, Started.__module__)
    reference = await asyncio.to_thread(sdengine.generate, tiny, req)
    assert same_pixels(await job.result(), reference)
    # Ray restarts the killed worker, which takes jobs again once its model is loaded.
    await until(lambda: executor.stats().workers == 2, "the killed worker is restarted")
    assert pid not in {w.pid for w in executor._workers}


@pytest.mark.slow
async def test_three_deaths_fail_the_job_and_no_worker_alive_refuses_at_once(cluster: Cluster) -> None:
    lone = start_cluster("local", 1, 0, ModelSpec("tiny"), CONFIG)
    executor = RayExecutor(lone, CONFIG, poll_wait=2.0)
    try:
        job = executor.submit(request(5, steps=30), "alice")
        events: list[Event] = []
        for attempt in range(1, 4):  # its only worker dies under it three times, restarted by Ray each time
            events += await first(job, Step)
            pid = executor.worker_of(job)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            if attempt < 3:
                events += await first(job, Retried)
        events += await asyncio.wait_for(events_of(job), CEILING)
        assert [e.attempt for e in events if isinstance(e, Retried)] == [2, 3]
        assert isinstance(events[-1], Failed) and "stopped 3 times" in str(events[-1].error)

        await until(lambda: executor.stats().workers == 1, "the worker is restarted once more")
        assert not executor.stats().down
        ray.kill(lone.actors[0], no_restart=True)
        await until(lambda: executor.stats().down, "stats say the executor is down")
        stats = executor.stats()
        assert stats.workers == 0 and "gone" in stats.down_reason
        with pytest.raises(ExecutorDown, match="No generator worker is running"):
            executor.submit(request(1), "alice")
    finally:
        await executor.shutdown()
        lone.close()


async def test_cancel_reaches_a_running_job_and_a_queued_one(executor: RayExecutor) -> None:
    running = [executor.submit(request(i, steps=50), f"user{i}") for i in range(2)]
    queued = executor.submit(request(3), "carol")
    await first(running[0], Step)
    queued.cancel()
    assert await asyncio.wait_for(events_of(queued), CEILING) == [Queued(1, 1), JobCancelled()]
    for job in running:
        job.cancel()
    for job in running:
        events = await asyncio.wait_for(events_of(job), CEILING)
        assert isinstance(events[-1], JobCancelled)
        steps = [e for e in events if isinstance(e, Step)]
        assert not steps or steps[-1].step < steps[-1].total  # stopped at a step, not at the end
        with pytest.raises(Cancelled):
            await job.result()
    await until(lambda: executor.stats().running_jobs == 0, "the workers are idle")


# ---- start-up ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_cluster_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\npath = "tiny"\n[storage]\ndatabase = "{(tmp_path / "db.sqlite3").as_posix()}"\n'
        f'[executor]\nbackend = "ray"\n[executor.ray]\naddress = "127.0.0.1:{port}"\nworkers = 1\ngpus_per_worker = 0\n'
    )
    env = {**os.environ, "DISCORD_TOKEN": "not-used"}
    done = subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(config), "--log-level", "WARNING"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"sdbot: cannot reach the Ray cluster at '127.0.0.1:{port}' (")
    assert "check [executor.ray] address" in done.stderr


def test_the_bot_process_imports_no_torch_with_ray() -> None:
    code = "import bot.__main__, bot.app, bot.preflight, sdengine.ray_executor"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "ray" in modules
    assert not {m for m in modules if m.split(".")[0] in ("torch", "diffusers", "transformers")}


# ---- the bot end to end --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("workers_threads")
async def test_imagine_through_the_bot_gives_the_local_backend_s_pixels(harness: Harness, cluster: Cluster) -> None:
    fake = harness.fake
    ray_settings = dataclasses.replace(
        harness.settings, executor=ExecutorSettings("ray", RaySettings("local", workers=2, gpus_per_worker=0))
    )
    bot = SDBot(ray_settings, cluster=cluster, progress_interval=0.05, guild_ready_timeout=0.05)
    async with run_client(fake, bot):
        await fake.wait_commands_synced(*COMMANDS)
        assert isinstance(bot.executor, RayExecutor) and isinstance(bot.models["tiny"], sdengine.ModelInfo)
        on_ray = await harness.result_of(
            await fake.slash_command("imagine", {"prompt": "a lighthouse", "seed": 7}), timeout=CEILING
        )
        gen_id = result_id(on_ray)
        again = await harness.result_of(await fake.slash_command("reroll", {"id": gen_id}), timeout=CEILING)
        assert "Exact reproduction" in again.content
    async with harness.running():
        local = await harness.result_of(
            await fake.slash_command("imagine", {"prompt": "a lighthouse", "seed": 7}), timeout=CEILING
        )
    ray_pixels = pixels(on_ray.attachments[0].data)
    assert np.array_equal(ray_pixels, pixels(local.attachments[0].data))
    assert np.array_equal(ray_pixels, pixels(again.attachments[0].data))
