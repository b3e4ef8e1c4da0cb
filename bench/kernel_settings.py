"""The kernel settings (sdengine.kernels) on and off, side by side in one run, on a random-weight UNet.

One guided step (a batch of 2 rows) is timed for each of: plain, channels_last, fused q/k/v, and both. The order
turns around every round (A B C D, D C B A, ...) so that machine noise hits all alike. Two copies of one UNet, one
with NCHW and one with NHWC weights (converting between calls would time the CPU's weight re-packing too), each
fused once and switched between its separate and its fused projections (diffusers keeps both).

    python bench/kernel_settings.py                          # SD-1.5-shaped UNet at 256x256 on the CPU
    python bench/kernel_settings.py --size 512 --device cuda
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import random_model, step_bench_main, timed, unet_inputs

VARIANTS = {"plain": (False, False), "channels_last": (True, False), "fused qkv": (False, True), "both": (True, True)}


def bench(shape: str, size: int, repeats: int, device: str) -> None:
    model = random_model(shape, device)
    latents, t, embeds = unet_inputs(model, size)
    unets = {False: model.unet, True: copy.deepcopy(model.unet).to(memory_format=torch.channels_last)}
    for unet in unets.values():
        unet.fuse_qkv_projections()
    unet = unets[False]

    def switch(channels_last: bool, fused: bool) -> None:
        nonlocal unet
        unet = unets[channels_last]
        unet.set_attn_processor(FusedAttnProcessor2_0() if fused else AttnProcessor2_0())

    def step() -> None:
        unet(latents, t, encoder_hidden_states=embeds)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    with torch.inference_mode():
        for name in names:  # warm-up of each: lazy imports, allocator growth, oneDNN's weight layouts
            switch(*VARIANTS[name])
            step()
        for i in range(repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                switch(*VARIANTS[name])
                times[name].append(timed(step, model.device))
    plain = statistics.median(times["plain"])
    medians = ", ".join(
        f"{name} {statistics.median(times[name]):.3f} s ({plain / statistics.median(times[name]):.2f}x)"
        for name in names
    )
    dtype = str(model.dtype).removeprefix("torch.")
    print(
        f"{shape} UNet {size}x{size}, one guided step on {model.device} ({dtype}), median of {repeats}, "
        f"speed-up plain/setting in brackets: {medians}",
        flush=True,
    )


if __name__ == "__main__":
    step_bench_main(__doc__, bench)
