"""Helpers shared by the benchmarks: random-weight models and a peak-memory probe."""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings
from collections.abc import Callable
from types import TracebackType

import torch

from sdengine import Model
from sdengine.models import pick_device
from sdengine.tiny import build_components


def random_model(shape: str, device: str = "auto") -> Model:
    """`tiny` or `sd15` (SD-1.5-shaped, 860M-parameter UNet) with random weights: same cost as the real one."""
    torch_device, dtype = pick_device(device)
    model = Model(name=f"random-{shape}", device=torch_device, dtype=dtype, **build_components(shape))
    for module in (model.text_encoder, model.unet, model.vae):
        module.to(torch_device)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    return model


def unet_inputs(model: Model, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, timesteps, text embeddings) of one guided step at `size` pixels: 2 rows, negative and positive."""
    unet, f = model.unet, model.latent_factor
    cpu = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(2, model.latent_channels, size // f, size // f, generator=cpu)  # (2, C, H/f, W/f)
    embeds = torch.randn(2, model.tokenizer.model_max_length, unet.config.cross_attention_dim, generator=cpu)
    t = torch.tensor([500.0, 500.0], device=model.device)
    return latents.to(model.device, model.dtype), t, embeds.to(model.device, model.dtype)


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds `run` takes, its GPU work included."""
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def step_bench_main(doc: str | None, bench: Callable[[str, int, int, str], None]) -> None:
    """The command line of the one-step UNet benchmarks: `bench(shape, size, repeats, device)`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="sd15", choices=["tiny", "sd15"])
    parser.add_argument("--size", type=int, default=256, help="pixels (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps each way (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    bench(args.shape, args.size, args.repeats, args.device)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra memory inside the block: CUDA allocations on a GPU, else process RSS sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self._base)
            time.sleep(0.005)

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"
