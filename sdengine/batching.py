"""The first `max_batch` on a CUDA device: as many images per UNet call as its free memory holds.

The executor's BatchLimit lowers `max_batch` after an out-of-memory error and probes back up, but never above the
ceiling it starts from; so this sets the most a GPU will ever batch. Too high costs a few retried calls at the
start; too low costs throughput for good. The estimate is for the model's native size, with the weights already on
the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch

from .info import ModelInfo
from .models import LOW_MEMORY_BELOW

log = logging.getLogger(__name__)

# Twice the old fixed 8, for GPUs with the room: past it, bigger calls only lengthen each step users wait on.
BATCH_CEILING = 16
# LOW_MEMORY_BELOW holds about this many images at the native size, in fp16.
_IMAGES_IN_LOW_MEMORY = 4


def per_image_bytes(kind: str, dtype: str = "float16") -> int:
    """Memory one more image of a UNet call takes at the native size of a `kind` model (a key of model_files.KINDS),
    with its share of the VAE decode; fp32 (`dtype` as ModelInfo writes it) takes twice fp16's."""
    scale = 2 if dtype == "float32" else 1
    return LOW_MEMORY_BELOW[kind] // _IMAGES_IN_LOW_MEMORY * scale


def batch_for_memory(free_bytes: int, per_image: int, ceiling: int = BATCH_CEILING) -> int:
    """Images per UNet call that fit in `free_bytes`: at least 1 (a call of one is always tried, and an
    out-of-memory error then reaches its user), at most `ceiling`."""
    if per_image <= 0:
        raise ValueError(f"per_image must be positive, not {per_image}")
    return max(1, min(ceiling, free_bytes // per_image))


def cuda_max_batch(device: torch.device, models: Collection[ModelInfo]) -> int:
    """`batch_for_memory` for the memory free on `device` now and the costliest of `models` per image."""
    free, _total = torch.cuda.mem_get_info(device)
    per_image = max(per_image_bytes(info.kind, info.dtype) for info in models)
    batch = batch_for_memory(free, per_image)
    log.info(
        "max_batch %d on %s: %.1f GiB free, about %.2f GiB per image (ceiling %d)",
        batch,
        device,
        free / 2**30,
        per_image / 2**30,
        BATCH_CEILING,
    )
    return batch


def default_max_batch(device: torch.device, models: Collection[ModelInfo] = ()) -> int:
    """The executor's first `max_batch`. On a CPU, memory bandwidth makes big batches slower than solo runs of
    SD-sized models (see bench/throughput.py), so it runs solo; GPUs gain from batching: on CUDA, as many as its
    free memory holds for the costliest of `models`, or 8 without models to go by."""
    if device.type == "cuda" and models:
        return cuda_max_batch(device, models)
    return {"cuda": 8, "mps": 4}.get(device.type, 1)
