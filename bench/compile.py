"""The UNet eager against the same UNet through torch.compile, side by side in one run, on random weights.

One guided step (a batch of 2 rows: negative and positive prompt) is timed each way, alternating (eager, compiled,
compiled, eager, ...) so that machine noise hits both alike; the compile itself is timed apart, on the first call.
Both ways share one module: `unet.compile()` compiles `unet(...)`, while `unet.forward(...)` still runs eager.

    python bench/compile.py                          # SD-1.5-shaped UNet at 256x256 on the CPU
    python bench/compile.py --size 512 --device cuda
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import random_model, step_bench_main, timed, unet_inputs
from sdengine.compiling import inductor_options


def bench(shape: str, size: int, repeats: int, device: str) -> None:
    model = random_model(shape, device)
    unet = model.unet
    latents, t, embeds = unet_inputs(model, size)

    def eager() -> None:
        unet.forward(latents, t, encoder_hidden_states=embeds)

    def compiled() -> None:
        unet(latents, t, encoder_hidden_states=embeds)

    with torch.inference_mode():
        eager()  # warm-up: lazy imports and allocator growth
        unet.compile(options=inductor_options(model.device))  # as `compile = true` does, without CUDA graphs
        compile_s = timed(compiled, model.device)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        pair = [("eager", eager), ("compiled", compiled)]
        for i in range(repeats):
            for name, run in pair if i % 2 == 0 else pair[::-1]:  # ABBA: neither side always goes first
                times[name].append(timed(run, model.device))
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(
        f"{shape:5} UNet {size}x{size}, one guided step on {model.device} ({str(model.dtype).removeprefix('torch.')}): "
        f"eager {eager_s:.3f} s  compiled {compiled_s:.3f} s  speed-up eager/compiled {eager_s / compiled_s:.2f}x  "
        f"(compile and first step {compile_s:.0f} s, median of {repeats})",
        flush=True,
    )


if __name__ == "__main__":
    step_bench_main(__doc__, bench)
