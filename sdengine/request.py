"""The request and result types that travel the whole way, from the bot to the worker and back.

Torch-free, like `errors`, so that the bot, the CLI's argument checks and `import sdengine` stay light.
"""

from __future__ import annotations

import secrets
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import InvalidRequest
from .loratags import check_lora_weights, parse_lora_tags

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SCHEDULERS = ("lms", "ddim", "euler", "euler_a", "dpmpp_2m")
# What users call each scheduler, as A1111 names them (also in the PNG `parameters`).
SCHEDULER_LABELS = {
    "dpmpp_2m": "DPM++ 2M Karras",
    "euler_a": "Euler a",
    "euler": "Euler",
    "ddim": "DDIM",
    "lms": "LMS",
}

# Image i of a request uses seed S+i, and every seed fits in 32 bits, so S+count-1 <= MAX_SEED.
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
MAX_SIDE = 2048
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_COUNT = 4
# A1111's hires fix: the upscalers it offers that need no extra weights, by the names its infotext uses.
HIRES_UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}
MAX_HIRES_SCALE = 4.0


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines the pixels of a generation.

    `width`/`height` of None mean the model's native size. `seed` of None means a random seed,
    which is reported in the result. `image` holds the raw bytes of an init image for image-to-image.
    `safety_check` runs the model's safety checker, if it has one, to fill `GenerationResult.nsfw`; it never
    changes the pixels. `model` names one of an executor's models (None: its default); `generate` is given its
    model and does not read it. LoRA adapters are named in the prompt, as A1111's `<lora:name:weight>` tags
    (sdengine.loratags): the stored prompt then carries them into rerolls and the infotext, and nothing can
    disagree with it.
    """

    prompt: str
    negative: str = ""
    scheduler: str = "dpmpp_2m"
    steps: int = 25
    guidance: float = 7.5
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    count: int = 1
    image: bytes | None = field(default=None, repr=False)
    strength: float = 0.75
    safety_check: bool = True
    model: str | None = None
    # A1111's hires fix (sdengine.hires): `hires_scale` (None: off) times the size, then an image-to-image pass of
    # `hires_steps` (None: `steps`) at `hires_strength`, from latents upscaled by `hires_upscaler`.
    hires_scale: float | None = None
    hires_strength: float = 0.5
    hires_steps: int | None = None
    hires_upscaler: str = "latent"


@dataclass(frozen=True)
class Progress:
    """One finished denoising step. `preview` is a small RGB image of the current latents, when drawn."""

    step: int
    total: int
    preview: Image.Image | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass
class GenerationResult:
    """The outcome of a request: one entry per image, in seed order."""

    images: list[Image.Image]
    pngs: list[bytes]  # PNG files that carry an A1111-style `parameters` chunk
    seeds: list[int]
    width: int
    height: int
    model: str
    scheduler: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    notices: list[str] = field(default_factory=list)  # e.g. a long prompt encoded in chunks
    # Per image: flagged by the safety checker. All False when no checker ran. The images are left as they are.
    nsfw: list[bool] = field(default_factory=list)


class CancelToken:
    """Thread-safe flag that the denoising loop checks between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def random_seed(count: int = 1) -> int:
    """A random first seed whose `count` images all get valid seeds (S+count-1 <= MAX_SEED)."""
    return secrets.randbelow(max(MAX_SEED + 2 - max(count, 1), 1))


def check_request(request: GenerationRequest) -> None:
    """Reject a request that no model can run, with one sentence that says what to change.

    Needs no model, so callers can run it before a slow model load; `pipeline.check_inputs` adds the checks
    that depend on the model (its latent scale factor for width and height).
    """
    if not _visible(request.prompt):
        raise InvalidRequest("The prompt is empty: describe the picture you want.")
    for name, text in (("prompt", request.prompt), ("negative prompt", request.negative)):
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"The {name} has {len(text)} characters: keep it under {MAX_PROMPT_CHARS}.")
        if "\x00" in text:
            raise InvalidRequest(f"The {name} contains a NUL character: remove it.")
    check_lora_weights(parse_lora_tags(request.prompt)[1])
    if request.scheduler not in SCHEDULERS:
        # Clipped: the name comes from the user and the sentence must stay short.
        raise InvalidRequest(f"Unknown scheduler {request.scheduler[:40]!r}: use one of {', '.join(SCHEDULERS)}.")
    if not 1 <= request.steps <= MAX_STEPS:
        raise InvalidRequest(f"Steps must be between 1 and {MAX_STEPS}, not {request.steps}.")
    if not 0 <= request.guidance <= MAX_GUIDANCE:  # also rejects NaN
        raise InvalidRequest(f"Guidance must be between 0 and {MAX_GUIDANCE:g}, not {request.guidance}.")
    if not 1 <= request.count <= MAX_COUNT:
        raise InvalidRequest(f"Count must be between 1 and {MAX_COUNT}, not {request.count}.")
    if request.seed is not None:
        if not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequest(f"The seed must be between 0 and {MAX_SEED}, not {request.seed}.")
        if request.seed + request.count - 1 > MAX_SEED:
            largest = MAX_SEED - request.count + 1
            raise InvalidRequest(
                f"With count {request.count} the seed can be at most {largest}, because image i uses seed+i."
            )
    if request.image is not None and not 0 < request.strength <= 1:
        raise InvalidRequest(f"Strength must be above 0 and at most 1, not {request.strength}.")
    if request.hires_scale is not None:
        _check_hires(request)
    for name, side in (("width", request.width), ("height", request.height)):
        # The lower bound and the multiple depend on the model's latent scale factor: check_inputs checks them.
        if side is not None and not 0 < side <= MAX_SIDE:
            raise InvalidRequest(f"The {name} must be a positive number of pixels up to {MAX_SIDE}, not {side}.")


def _check_hires(request: GenerationRequest) -> None:
    if not 1 < request.hires_scale <= MAX_HIRES_SCALE:  # type: ignore[operator]  # also rejects NaN
        raise InvalidRequest(
            f"The hires scale must be above 1 and at most {MAX_HIRES_SCALE:g}, not {request.hires_scale}."
        )
    if not 0 < request.hires_strength <= 1:
        raise InvalidRequest(f"The hires strength must be above 0 and at most 1, not {request.hires_strength}.")
    if request.hires_steps is not None and not 1 <= request.hires_steps <= MAX_STEPS:
        raise InvalidRequest(f"Hires steps must be between 1 and {MAX_STEPS}, not {request.hires_steps}.")
    if request.hires_upscaler not in HIRES_UPSCALERS:
        raise InvalidRequest(
            f"Unknown hires upscaler {request.hires_upscaler[:40]!r}: use one of {', '.join(HIRES_UPSCALERS)}."
        )
    if hires_steps_run(request) == 0:
        raise InvalidRequest(
            f"Hires strength {request.hires_strength:g} leaves no steps out of {request.hires_steps or request.steps}: "
            "raise the hires strength or the hires steps."
        )


def hires_size(width: int, height: int, scale: float, factor: int) -> tuple[int, int]:
    """The size a hires pass draws at, as A1111 computes it: each side times `scale`, down to whole latent cells."""
    return int(width * scale) // factor * factor, int(height * scale) // factor * factor


def hires_steps_run(request: GenerationRequest) -> int:
    """The steps the hires pass runs: image-to-image skips the first (1 - strength) of its `hires_steps`."""
    steps = request.hires_steps or request.steps
    return min(int(steps * request.hires_strength), steps)


def _visible(text: str) -> bool:
    """Whether `text` has a character that shows: zero-width spaces, joiners and bidi controls (category Cf) do not."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)
