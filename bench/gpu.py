"""The prepared GPU script of issue 11: diffusers' pipeline against the engine, eager and compiled, on one GPU.

Random weights with SD 1.5's exact shapes (no download), 512x512, fp16, DPM++ 2M Karras, guidance 7.5:
- diffusers' `StableDiffusionPipeline` (SDPA attention, its default), the engine eager, the engine with the kernel
  settings (`channels_last` and `fuse_qkv`, what "auto" picks on CUDA), and the engine with those and
  `compile = true` (on CUDA with CUDA graphs, its default), at batch 1, 4, 8 and 16, for 20 and 50 steps;
- columns: it/s (one guided UNet step of the whole batch is one iteration, timed from the end of the first step to
  the end of the last, as a progress bar counts), img/s (end to end: prompts, loop and VAE decode, without PNG
  encoding, as diffusers returns PIL images), peak VRAM (`torch.cuda.max_memory_allocated`; RSS on a CPU), and
  img/s relative to diffusers' at the same batch and steps;
- then the executor (compiled model, `max_batch` 16) with 16 concurrent one-image requests of 20 steps: img/s,
  p50/p95 latency.
Each case runs once after a short warm-up of its batch size. Rows that would pass `--budget` seconds are skipped
and marked so, so that the whole run stays within about 8 minutes on an H100.

    python bench/gpu.py --json gpu.json     # on a GPU
    python bench/gpu.py --smoke             # end to end on a CPU: tiny, 64x64, a few steps, under a minute

The smoke run's "compiled" traces with dynamo only (backend "eager"): inductor on a CPU is tests/test_compile.py.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import PeakMemory, random_model
from bench.throughput import percentile
from sdengine import GenerationRequest, Model
from sdengine.compiling import compile_model
from sdengine.executor import Executor, ExecutorConfig
from sdengine.kernels import apply_kernels
from sdengine.pipeline import decode, denoise_step, prepare
from sdengine.request import MAX_COUNT
from sdengine.schedulers import make_scheduler

PROMPT = "a lighthouse on a cliff at dawn, oil painting"
SCHEDULER = "dpmpp_2m"


@dataclass(frozen=True)
class Plan:
    shape: str
    size: int
    batches: tuple[int, ...]
    steps: tuple[int, ...]
    requests: int  # concurrent executor requests
    backend: str  # torch.compile backend


FULL = Plan("sd15", 512, (1, 4, 8, 16), (20, 50), 16, "inductor")
SMOKE = Plan("tiny", 64, (1, 2), (3, 5), 16, "eager")


@dataclass
class Row:
    runner: str
    batch: int
    steps: int
    its: float = 0.0  # guided UNet steps of the whole batch per second
    img_s: float = 0.0
    peak_mib: float = 0.0
    vs_diffusers: float = 0.0  # img/s over diffusers' img/s at the same batch and steps
    skipped: str = ""


class Clock:
    """Synchronised timestamps: the first and last step end, and the whole run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[float] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())


def run_diffusers(pipe: Any, model: Model, batch: int, steps: int, size: int, clock: Clock) -> None:
    def on_step_end(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        clock.mark()
        return kwargs

    pipe.scheduler = make_scheduler(SCHEDULER, model.scheduler_config)
    pipe(
        PROMPT,
        num_images_per_prompt=batch,
        num_inference_steps=steps,
        width=size,
        height=size,
        generator=torch.Generator("cpu").manual_seed(1),
        callback_on_step_end=on_step_end,
    )


def run_engine(model: Model, batch: int, steps: int, size: int, clock: Clock) -> None:
    """The pipeline's pieces, as the executor uses them: requests hold at most MAX_COUNT images, so a batch of 16 is
    4 requests whose samples share every UNet call."""
    plans = []
    for first in range(0, batch, MAX_COUNT):
        count = min(MAX_COUNT, batch - first)
        request = GenerationRequest(PROMPT, steps=steps, seed=first, width=size, height=size, count=count)
        plans.append(prepare(model, request))
    samples = [sample for plan in plans for sample in plan.samples]
    for _ in range(steps):
        denoise_step(model, samples)
        clock.mark()
    decode(model, samples)


def measure(run: Callable[[Clock], None], device: torch.device, batch: int, steps: int) -> tuple[float, float, float]:
    """(it/s, img/s, peak MiB) of one run."""
    clock = Clock(device)
    with PeakMemory(device) as peak:
        clock.mark()
        run(clock)
        clock.mark()
    loop = clock.marks[-2] - clock.marks[1]  # from the end of the first step to the end of the last
    its = (steps - 1) / loop if steps > 1 and loop > 0 else float("nan")
    return its, batch / (clock.marks[-1] - clock.marks[0]), peak.peak / 2**20


def matrix(model: Model, plan: Plan, deadline: float, rows: list[Row]) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=make_scheduler(SCHEDULER, model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    runners: dict[str, Callable[[int, int, Clock], None]] = {
        "diffusers": lambda b, s, c: run_diffusers(pipe, model, b, s, plan.size, c),
        "engine eager": lambda b, s, c: run_engine(model, b, s, plan.size, c),
    }
    for name in ("diffusers", "engine eager", "engine kernels", "engine compiled"):
        late = time.perf_counter() > deadline
        if name == "engine kernels" and not late:  # in place, so after diffusers' runs, which share the UNet
            apply_kernels(model, channels_last=True, fuse_qkv=True)
            runners[name] = runners["engine eager"]
        if name == "engine compiled" and not late:  # after the eager runs: it compiles pipe.unet in place too
            started = time.perf_counter()
            compile_model(model, plan.backend)
            print(f"compile and warm-up ({plan.backend}): {time.perf_counter() - started:.0f} s", flush=True)
            runners[name] = runners["engine eager"]
        for batch in plan.batches:
            late = time.perf_counter() > deadline
            if not late:
                runners[name](batch, 2, Clock(model.device))  # warm-up of this batch size (and its compile)
            for steps in plan.steps:
                row = Row(name, batch, steps, skipped="time budget" if late else "")
                if not late:
                    run = functools.partial(runners[name], batch, steps)
                    row.its, row.img_s, row.peak_mib = measure(run, model.device, batch, steps)
                rows.append(row)
                print(format_row(row), flush=True)
    for row in rows:
        base = next(r for r in rows if r.runner == "diffusers" and (r.batch, r.steps) == (row.batch, row.steps))
        row.vs_diffusers = row.img_s / base.img_s if base.img_s else 0.0


async def executor_run(model: Model, plan: Plan, steps: int) -> dict[str, float]:
    executor = Executor(model, ExecutorConfig(max_batch=plan.requests, max_pending_per_owner=1, max_queued=100))
    started = time.perf_counter()
    jobs = [
        executor.submit(GenerationRequest(PROMPT, steps=steps, seed=i, width=plan.size, height=plan.size), f"user{i}")
        for i in range(plan.requests)
    ]

    async def latency(job: Any) -> float:
        await job.result()
        return time.perf_counter() - started

    latencies = await asyncio.gather(*(latency(job) for job in jobs))
    total = time.perf_counter() - started
    await executor.shutdown()
    return {
        "requests": plan.requests,
        "steps": steps,
        "img_s": plan.requests / total,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
    }


def format_row(row: Row) -> str:
    if row.skipped:
        return f"{row.runner:16}{row.batch:>6}{row.steps:>6}   skipped ({row.skipped})"
    ratio = f"{row.vs_diffusers:>9.2f}x" if row.vs_diffusers else f"{'':>10}"
    return f"{row.runner:16}{row.batch:>6}{row.steps:>6}{row.its:>9.2f}{row.img_s:>9.2f}{row.peak_mib:>11.0f}{ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device, end to end")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the matrix (default 390; smoke 90)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    plan = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    deadline = started + (args.budget or (90 if args.smoke else 390))

    model = random_model(plan.shape, args.device)
    name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else str(model.device)
    print(f"{plan.shape} {plan.size}x{plan.size}, {str(model.dtype).removeprefix('torch.')} on {name}, {SCHEDULER}")
    rows: list[Row] = []
    matrix(model, plan, deadline, rows)
    print(f"\n{'runner':16}{'batch':>6}{'steps':>6}{'it/s':>9}{'img/s':>9}{'peak MiB':>11}{'vs diff.':>10}")
    for row in rows:
        print(format_row(row))

    executor = asyncio.run(executor_run(model, plan, plan.steps[0]))
    kind = "compiled" if model.compiled else "eager"
    print(
        f"\nexecutor, engine {kind}, {executor['requests']} concurrent requests of {executor['steps']} steps: "
        f"{executor['img_s']:.2f} img/s, latency p50 {executor['p50_s']:.2f} s, p95 {executor['p95_s']:.2f} s"
    )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        result = {
            "device": name,
            "torch": torch.__version__,
            "plan": asdict(plan),
            "rows": [asdict(row) for row in rows],
            "executor": executor,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
