"""The executor's UNet and VAE calls on one device: many jobs' images per call, split to fit its memory.

A UNet call that runs out of memory lowers `max_batch` (a `BatchLimit`) below the images it held and is retried in
smaller calls; any other failed call is retried image by image, so that only the culprit fails. A decode that runs
out of memory is retried image by image. Nothing here knows about jobs: results and errors go back per sample.
"""

from __future__ import annotations

import gc
import logging
from collections import deque
from typing import Any

import torch
from PIL import Image

from .errors import OutOfMemory, SDEngineError
from .jobs import BatchLimit
from .models import Model
from .pipeline import call_key, predict_noise
from .sampling import Sample, decode

log = logging.getLogger(__name__)

OUT_OF_MEMORY_MESSAGE = "The GPU ran out of memory for this request: lower the size or count."


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises `torch.OutOfMemoryError`; MPS raises a plain `RuntimeError` that says "out of memory"."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def engine_error(exc: BaseException) -> SDEngineError:
    """The error a user sees: engine errors as they are, anything else as one plain sentence."""
    if isinstance(exc, SDEngineError):
        return exc
    if is_out_of_memory(exc):
        return OutOfMemory(OUT_OF_MEMORY_MESSAGE)
    return SDEngineError(f"The generator hit an internal error ({type(exc).__name__}): try again.")


def _chunks(samples: list[Sample], size: int) -> list[list[Sample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


class DeviceCalls:
    """Batched UNet and VAE calls on `device`, within `limit`; see the module docstring."""

    def __init__(self, device: torch.device, limit: BatchLimit) -> None:
        self.device = device
        self.limit = limit

    def predict_all(self, model: Model, samples: list[Sample]) -> dict[int, torch.Tensor | Exception]:
        """Each sample's noise prediction, or the error that stopped it, keyed by `id(sample)`. Calls hold at most
        `limit.value` images of one shape."""
        by_shape: dict[tuple[Any, ...], list[Sample]] = {}
        for s in samples:  # different LoRA adapters or weights never share a call
            by_shape.setdefault(call_key(s), []).append(s)
        pending = deque(call for group in by_shape.values() for call in _chunks(group, self.limit.value))
        out: dict[int, torch.Tensor | Exception] = {}
        while pending:
            call = pending.popleft()
            result = self._predict(model, call)
            if isinstance(result, list):
                self.limit.fitted(len(call))
                out.update(zip(map(id, call), result, strict=True))
            elif len(call) == 1:
                out[id(call[0])] = result
            elif isinstance(result, OutOfMemory):
                self.free_memory()
                self.limit.out_of_memory(len(call))
                # Split the calls still waiting too: none of this step's calls may exceed the new limit.
                pending = deque(c for waiting in [call, *pending] for c in _chunks(waiting, self.limit.value))
            else:
                pending.extendleft([s] for s in reversed(call))  # image by image, to find the culprit
        return out

    def _predict(self, model: Model, samples: list[Sample]) -> list[torch.Tensor] | Exception:
        """Noise predictions of one call, or the error that stopped it. Changes no state."""
        try:
            return predict_noise(model, samples)
        except Exception as exc:
            if not is_out_of_memory(exc):
                return exc
            log.warning("UNet call of %d images ran out of memory (max_batch %d)", len(samples), self.limit.value)
        # Built outside the except block, so the traceback and the tensors it holds can be freed.
        return OutOfMemory(OUT_OF_MEMORY_MESSAGE)

    def decode_groups(self, model: Model, groups: list[list[Sample]]) -> list[list[Image.Image] | Exception]:
        """Decode the groups (one per job) in one call; if that fails, group by group, so only the culprit fails."""
        images = self._decode(model, [s for group in groups for s in group])
        if isinstance(images, Exception):
            return [images] if len(groups) == 1 else [self.decode_groups(model, [group])[0] for group in groups]
        out: list[list[Image.Image] | Exception] = []
        start = 0
        for group in groups:
            out.append(images[start : start + len(group)])
            start += len(group)
        return out

    def _decode(self, model: Model, samples: list[Sample]) -> list[Image.Image] | Exception:
        """VAE-decode in one call, or one image at a time if that runs out of memory."""
        try:
            return decode(model, samples)
        except Exception as exc:
            if len(samples) == 1 or not is_out_of_memory(exc):
                return exc
        self.free_memory()
        try:
            return [image for s in samples for image in decode(model, [s])]
        except Exception as exc:
            return exc

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()
