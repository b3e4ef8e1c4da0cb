"""sdengine: a hand-written Stable Diffusion loop over diffusers and transformers components.

model = sdengine.load_model("tiny")
result = sdengine.generate(model, sdengine.GenerationRequest("a spaceship", seed=1))
open("out.png", "wb").write(result.pngs[0])

`import sdengine`, the request and result types, the limits and the errors need no torch: the names that do
(models, the pipeline, images, the safety checker) are imported on first use, so the bot, `sdengine --help`
and argument errors stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import Cancelled, InvalidRequest, ModelLoadError, OutOfMemory, SDEngineError
from .info import ModelInfo, check_for_model, describe
from .request import (
    DEFAULT_MODEL,
    HIRES_UPSCALERS,
    MAX_SEED,
    SCHEDULER_LABELS,
    SCHEDULERS,
    CancelToken,
    GenerationRequest,
    GenerationResult,
    Progress,
    check_request,
    hires_size,
    hires_steps_run,
    random_seed,
)

if TYPE_CHECKING:
    from .grid import image_grid
    from .images import decode_image, read_parameters
    from .models import Model, load_model, save_model
    from .pipeline import check_inputs, generate
    from .safety import SafetyChecker

# name -> submodule that defines it, imported on first access.
_LAZY = {
    "image_grid": "grid",
    "decode_image": "images",
    "read_parameters": "images",
    "Model": "models",
    "load_model": "models",
    "save_model": "models",
    "check_inputs": "pipeline",
    "generate": "pipeline",
    "SafetyChecker": "safety",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DEFAULT_MODEL",
    "HIRES_UPSCALERS",
    "MAX_SEED",
    "SCHEDULERS",
    "SCHEDULER_LABELS",
    "CancelToken",
    "Cancelled",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequest",
    "Model",
    "ModelInfo",
    "ModelLoadError",
    "OutOfMemory",
    "Progress",
    "SDEngineError",
    "SafetyChecker",
    "check_for_model",
    "check_inputs",
    "check_request",
    "decode_image",
    "describe",
    "generate",
    "hires_size",
    "hires_steps_run",
    "image_grid",
    "load_model",
    "random_seed",
    "read_parameters",
    "save_model",
]
