"""sdengine: a hand-written Stable Diffusion loop over diffusers and transformers components.

model = sdengine.load_model("tiny")
result = sdengine.generate(model, sdengine.GenerationRequest("a spaceship", seed=1))
open("out.png", "wb").write(result.pngs[0])
"""

from .errors import Cancelled, InvalidRequest, ModelLoadError, OutOfMemory, SDEngineError
from .images import decode_image, read_parameters
from .models import DEFAULT_MODEL, Model, load_model, save_model
from .pipeline import check_inputs, generate
from .request import SCHEDULERS, CancelToken, GenerationRequest, GenerationResult, Progress
from .safety import SafetyChecker

__all__ = [
    "DEFAULT_MODEL",
    "SCHEDULERS",
    "CancelToken",
    "Cancelled",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequest",
    "Model",
    "ModelLoadError",
    "OutOfMemory",
    "Progress",
    "SDEngineError",
    "SafetyChecker",
    "check_inputs",
    "decode_image",
    "generate",
    "load_model",
    "read_parameters",
    "save_model",
]
