"""The request and result types that travel the whole way, from the bot to the worker and back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

SCHEDULERS = ("lms", "ddim", "euler", "euler_a", "dpmpp_2m")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines the pixels of a generation.

    `width`/`height` of None mean the model's native size. `seed` of None means a random seed,
    which is reported in the result. `image` holds the raw bytes of an init image for image-to-image.
    `safety_check` runs the model's safety checker, if it has one, to fill `GenerationResult.nsfw`; it never
    changes the pixels.
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
    notices: list[str] = field(default_factory=list)  # e.g. prompt truncation
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
