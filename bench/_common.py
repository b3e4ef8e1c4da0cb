"""Helpers shared by the benchmarks: random-weight models and a peak-memory probe."""

from __future__ import annotations

import os
import threading
import time
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
