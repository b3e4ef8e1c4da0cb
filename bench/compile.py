"""The UNet eager against the same UNet through torch.compile, side by side in one run, on random weights.

One guided step (a batch of 2 rows: negative and positive prompt) is timed each way, in turns whose order rotates
(so that machine noise hits all alike); each compile is timed apart, on its first call. The ways:
- eager;
- compiled as `compile = true` compiles it (on a CPU with inductor's freezing: sdengine.compiling.freezing;
  without CUDA graphs, which bench/gpu.py covers);
- on a CPU also compiled without freezing, on a copy of the UNet, to show what freezing brings.

    python bench/compile.py                          # SD-1.5-shaped UNet at 256x256 on the CPU
    python bench/compile.py --size 512 --device cuda
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import random_model, step_bench_main, timed, unet_inputs
from sdengine.compiling import freezing


def bench(shape: str, size: int, repeats: int, device: str) -> None:
    model = random_model(shape, device)
    latents, t, embeds = unet_inputs(model, size)
    unet = model.unet
    ways: dict[str, Callable[[], object]] = {"eager": lambda: unet.forward(latents, t, encoder_hidden_states=embeds)}
    compile_s: dict[str, float] = {}
    with torch.inference_mode():
        ways["eager"]()  # warm-up: lazy imports and allocator growth
        plain = copy.deepcopy(unet) if model.device.type == "cpu" else None  # compiled without freezing
        # `unet.compile()` compiles `unet(...)`, while `unet.forward(...)` still runs eager.
        unet.compile()
        ways["compiled"] = lambda: unet(latents, t, encoder_hidden_states=embeds)
        with freezing(model.device):
            compile_s["compiled"] = timed(ways["compiled"], model.device)
        if plain is not None:
            plain.compile()
            ways["not frozen"] = lambda: plain(latents, t, encoder_hidden_states=embeds)
            compile_s["not frozen"] = timed(ways["not frozen"], model.device)
        names = list(ways)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(repeats):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # each way goes first in turn
                times[name].append(timed(ways[name], model.device))
    median = {name: statistics.median(times[name]) for name in names}
    print(
        f"{shape:5} UNet {size}x{size}, one guided step on {model.device} ({str(model.dtype).removeprefix('torch.')}), "
        f"median of {repeats}: eager {median['eager']:.3f} s",
        flush=True,
    )
    for name in names[1:]:
        print(
            f"  {name:10} {median[name]:.3f} s  speed-up eager/{name} {median['eager'] / median[name]:.2f}x  "
            f"(compile and first step {compile_s[name]:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    step_bench_main(__doc__, bench)
