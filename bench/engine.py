"""sdengine's hand-written loop against diffusers' StableDiffusionPipeline on the same random-weight model.

Runs alternate (ours, theirs, theirs, ours, ...) in one process so machine noise hits both alike, and
prints the median time ratio engine/diffusers (<= 1.00 means the loop adds no overhead) and peak memory.

    python bench/engine.py                 # tiny at 64x64 and SD-1.5-shaped at 256x256
    python bench/engine.py --shapes sd15 --size 512 --steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import PeakMemory, mib, random_model
from sdengine import GenerationRequest, generate
from sdengine.schedulers import make_scheduler


def bench(shape: str, size: int, steps: int, repeats: int, device: str) -> None:
    from diffusers import StableDiffusionPipeline

    model = random_model(shape, device)
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=make_scheduler("dpmpp_2m", model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompt = "a lighthouse on a cliff at dawn, oil painting"

    def ours() -> None:
        generate(model, GenerationRequest(prompt, steps=steps, seed=1, width=size, height=size))

    def theirs() -> None:
        pipe.scheduler = make_scheduler("dpmpp_2m", model.scheduler_config)
        pipe(
            prompt,
            num_inference_steps=steps,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(1),
        )

    ours()  # warm-up: first calls pay for lazy imports and allocator growth
    theirs()
    times: dict[str, list[float]] = {"engine": [], "diffusers": []}
    peaks: dict[str, int] = {"engine": 0, "diffusers": 0}
    pair = [("engine", ours), ("diffusers", theirs)]
    for i in range(repeats):
        for name, run in pair if i % 2 == 0 else pair[::-1]:  # ABBA order: neither side always goes first
            with PeakMemory(model.device) as peak:
                started = time.perf_counter()
                run()
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
            peaks[name] = max(peaks[name], peak.peak)
    ours_s, theirs_s = statistics.median(times["engine"]), statistics.median(times["diffusers"])
    print(
        f"{shape:5} {size}x{size} {steps:2} steps on {model.device}: "
        f"engine {ours_s:7.2f} s  diffusers {theirs_s:7.2f} s  ratio engine/diffusers {ours_s / theirs_s:.3f}  "
        f"peak memory engine {mib(peaks['engine'])} diffusers {mib(peaks['diffusers'])}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--size", type=int, default=None, help="pixels; default 64 for tiny, 256 for sd15")
    parser.add_argument("--steps", type=int, default=None, help="default 25 for tiny, 4 for sd15")
    parser.add_argument("--repeats", type=int, default=None, help="alternating runs each; default 10 tiny, 4 sd15")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    for shape in args.shapes:
        tiny = shape == "tiny"
        bench(
            shape,
            args.size or (64 if tiny else 256),
            args.steps or (25 if tiny else 4),
            args.repeats or (10 if tiny else 4),
            args.device,
        )


if __name__ == "__main__":
    main()
