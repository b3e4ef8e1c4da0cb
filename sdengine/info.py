"""What the bot needs to know about a model, without torch: its name, sizes and whether it has a safety checker.

A local executor describes the model it loaded; on the Ray backend the workers describe theirs, and the bot
process loads no model at all.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from .errors import InvalidRequest
from .loratags import Loras, parse_lora_tags
from .request import MAX_SIDE, GenerationRequest, check_request, hires_size


class _Described(Protocol):
    """The parts of `sdengine.Model` that `describe` reads (a Protocol, so this module needs no torch)."""

    name: str

    @property
    def native_size(self) -> int: ...

    @property
    def latent_factor(self) -> int: ...

    @property
    def safety_checker(self) -> object | None: ...


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it: `sdengine.load_model`'s arguments."""

    path: str
    device: str = "auto"
    dtype: str = "auto"
    safety_checker: bool = True
    memory: str = "auto"
    compile: bool = False
    loras: str = ""  # a folder of LoRA .safetensors files; "" for none
    channels_last: bool | None = None  # None: auto, on for CUDA (sdengine.kernels)
    fuse_qkv: bool | None = None  # None: auto, on for CUDA (sdengine.kernels)
    cuda_graphs: bool = True  # with compile on CUDA: the UNet replays CUDA graphs (sdengine.compiling)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    native_size: int  # the image side the UNet was built for (512 for SD 1.5)
    latent_factor: int  # pixels per latent cell along each side (8 for SD 1.5)
    has_safety_checker: bool
    device: str = ""  # e.g. "cuda", for the logs
    dtype: str = ""  # e.g. "float16"
    kind: str = "sd1"  # sd1, sd2 or sdxl
    loras: tuple[str, ...] = ()  # the names of its LoRA adapters


def describe(model: _Described | ModelInfo) -> ModelInfo:
    """A loaded `sdengine.Model` (or a description already) as a `ModelInfo`."""
    if isinstance(model, ModelInfo):
        return model
    return ModelInfo(
        name=model.name,
        native_size=model.native_size,
        latent_factor=model.latent_factor,
        has_safety_checker=model.safety_checker is not None,
        device=str(getattr(model, "device", "")),
        dtype=str(getattr(model, "dtype", "")).removeprefix("torch."),
        kind=str(getattr(model, "kind", "sd1")),
        loras=tuple(sorted(getattr(model, "loras", {}))),
    )


def check_for_model(info: ModelInfo, request: GenerationRequest) -> None:
    """`pipeline.check_inputs` without torch: `check_request`, then the sizes this model's latent factor allows."""
    check_request(request)
    check_sides(info.latent_factor, request)
    # An init image's size follows the image when not given; `pipeline.prepare` checks it again once known.
    check_hires_size(info.latent_factor, request.width or info.native_size, request.height or info.native_size, request)
    check_lora_names(info.loras, parse_lora_tags(request.prompt)[1])


def check_lora_names(known: Collection[str], loras: Loras) -> None:
    """Every adapter a request names must be one of the model's."""
    for name, _weight in loras:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise InvalidRequest(f"Unknown LoRA {name[:40]!r}: this model has {listed[:300]}.")


def check_sides(factor: int, request: GenerationRequest) -> None:
    """Width and height a model with latent factor `factor` can draw: 8 latent cells at least, whole cells."""
    low = 8 * factor
    for name, side in (("width", request.width), ("height", request.height)):
        if side is None:
            continue
        if not low <= side <= MAX_SIDE:
            raise InvalidRequest(f"The {name} must be between {low} and {MAX_SIDE} pixels, not {side}.")
        if side % factor:
            raise InvalidRequest(f"The {name} must be a multiple of {factor} for this model, not {side}.")


def check_hires_size(factor: int, width: int, height: int, request: GenerationRequest) -> None:
    """A hires pass from `width` x `height` must stay within MAX_SIDE."""
    if request.hires_scale is None:
        return
    big_width, big_height = hires_size(width, height, request.hires_scale, factor)
    if max(big_width, big_height) > MAX_SIDE:
        raise InvalidRequest(
            f"Hires {request.hires_scale:g}x of {width}x{height} makes {big_width}x{big_height}, over {MAX_SIDE} "
            "pixels a side: lower the size or the hires scale."
        )
