"""Batched executor against a strictly sequential one (batch 1), side by side in one run.

N requests from several owners arrive at once. For each executor it prints images per minute, p50/p95
latency, the worst owner's finish time relative to its round-robin fair share, and the event loop's p99
lag while generating; then the ratio batched/sequential, and where each thread spent its time (the
executor's pipeline calls, timed per thread: the worker thread should do GPU work only).

    python bench/throughput.py                       # tiny at 64x64 and SD-1.5-shaped at 256x256
    python bench/throughput.py --shapes sd15 --size 512 --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sdengine.executor
from bench._common import random_model
from sdengine import GenerationRequest, Model
from sdengine.executor import Executor, ExecutorConfig

# (thread name, pipeline call) -> seconds, filled by `time_pipeline_calls`
BUSY: defaultdict[tuple[str, str], float] = defaultdict(float)
# The pipeline calls the executor makes: prompts and latents, UNet, scheduler step, latent preview, VAE,
# PNG encoding with infotext (and the safety checker).
PIPELINE_CALLS = ("prepare", "predict_noise", "advance", "preview", "decode", "finish")


def time_pipeline_calls() -> None:
    """Wrap the executor's pipeline calls so that each adds its time to BUSY, under the calling thread's name."""

    def timed(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                thread = threading.current_thread().name.split("_")[0]  # pool threads: one row for the pool
                BUSY[thread, name] += time.perf_counter() - started

        return wrapper

    for name in PIPELINE_CALLS:
        setattr(sdengine.executor, name, timed(name, getattr(sdengine.executor, name)))


def report_busy(seconds: float) -> None:
    """Per thread: seconds in each pipeline call, and the share of the run they fill."""
    for thread in sorted({t for t, _ in BUSY}):
        calls = {name: BUSY[thread, name] for name in PIPELINE_CALLS if (thread, name) in BUSY}
        parts = "  ".join(f"{name} {s:.2f}" for name, s in calls.items())
        print(f"  thread {thread}: {parts} s; busy {sum(calls.values()) / seconds:.0%} of {seconds:.1f} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(model: Model, max_batch: int, owners: list[str], size: int, steps: int) -> dict[str, float]:
    executor = Executor(model, ExecutorConfig(max_batch=max_batch, max_pending_per_owner=100, max_queued=1000))
    schedulers = ["dpmpp_2m", "euler_a", "ddim", "lms"]
    lags: list[float] = []
    finished = False

    async def probe() -> None:
        while not finished:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    probe_task = asyncio.create_task(probe())
    started = time.perf_counter()
    jobs = [
        executor.submit(
            GenerationRequest(
                f"request {i}", scheduler=schedulers[i % 4], steps=steps, seed=i, width=size, height=size
            ),
            owner=owner,
        )
        for i, owner in enumerate(owners)
    ]

    async def latency(job_index: int) -> float:
        await jobs[job_index].result()
        return time.perf_counter() - started

    latencies = await asyncio.gather(*(latency(i) for i in range(len(jobs))))
    total = time.perf_counter() - started
    finished = True
    await probe_task
    await executor.shutdown()

    # Under round-robin with equal jobs, an owner with k jobs finishes once every owner has run min(k, its own).
    counts = Counter(owners)
    worst = 0.0
    for owner, k in counts.items():
        fair = total * sum(min(k, other) for other in counts.values()) / len(owners)
        last = max(lat for lat, o in zip(latencies, owners, strict=True) if o == owner)
        worst = max(worst, last / fair)
    return {
        "seconds": total,
        "images_per_minute": 60 * len(jobs) / total,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "worst_owner_vs_fair": worst,
        "loop_lag_p99_ms": 1000 * percentile(lags, 0.99),
    }


def report(label: str, m: dict[str, float]) -> None:
    print(
        f"  {label:10} {m['images_per_minute']:8.1f} img/min  p50 {m['p50']:7.2f} s  p95 {m['p95']:7.2f} s  "
        f"worst owner/fair {m['worst_owner_vs_fair']:.2f}  loop lag p99 {m['loop_lag_p99_ms']:.1f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--owners", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="max_batch of the batched executor")
    parser.add_argument("--size", type=int, default=None, help="pixels; default 64 for tiny, 256 for sd15")
    parser.add_argument("--steps", type=int, default=None, help="default 20 for tiny, 4 for sd15")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    # Uneven owners: owner 0 sends half of the requests, the rest share the other half.
    owners = [f"owner{0 if i % 2 == 0 else 1 + (i // 2) % (args.owners - 1)}" for i in range(args.requests)]
    time_pipeline_calls()
    for shape in args.shapes:
        tiny = shape == "tiny"
        size, steps = args.size or (64 if tiny else 256), args.steps or (20 if tiny else 4)
        model = random_model(shape, args.device)
        print(
            f"{shape} {size}x{size}, {steps} steps, {args.requests} requests from {args.owners} owners, {model.device}:"
        )
        asyncio.run(run(model, 1, owners[:2], size, 1))  # warm-up
        sequential = asyncio.run(run(model, 1, owners, size, steps))
        BUSY.clear()
        batched = asyncio.run(run(model, args.batch, owners, size, steps))
        report("sequential", sequential)
        report(f"batch {args.batch}", batched)
        ratio = batched["images_per_minute"] / sequential["images_per_minute"]
        print(f"  ratio batched/sequential {ratio:.2f}; time per thread in the batched run:", flush=True)
        report_busy(batched["seconds"])


if __name__ == "__main__":
    main()
