"""LoRA adapters: a model's folder of LoRA `.safetensors` files, loaded once through diffusers' peft integration and
switched per request, never fused into the weights.

Each file is an adapter named by its file stem. `load_adapters` loads them as `StableDiffusionLoraLoaderMixin.
load_lora_weights` (or the SDXL mixin's) does, so a file gives what diffusers' pipelines give with it.
`activate_unet` / `activate_text` turn on exactly a request's adapters, at its weights, right before its UNet or
text-encoder calls (`set_adapters`, as the pipelines' `set_adapters` does; all off when it has none).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelLoadError
from .loratags import Loras

if TYPE_CHECKING:
    from .models import Model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapter:
    name: str  # the file stem: what users write in `<lora:name:weight>`
    key: str  # the peft adapter name; file stems may hold characters peft's module dicts refuse
    path: Path
    hash: str  # the first 12 hex digits of the file's sha256, as A1111 writes `Lora hashes`
    parts: frozenset[str]  # the components it changes: unet, text_encoder, text_encoder_2


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def load_adapters(model: Model, folder: str) -> None:
    """Load every `*.safetensors` in `folder` into the model as a disabled adapter."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"The LoRA folder {folder!r} is not a folder: check the path.")
    for i, file in enumerate(sorted(path.glob("*.safetensors"))):
        key = f"lora{i}"
        try:
            _load_file(model, file, key)
        except ModelLoadError:
            raise
        except Exception as exc:  # diffusers and peft raise many types on a damaged or mismatched file
            from .model_files import KINDS

            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelLoadError(
                f"Could not load the LoRA {str(file)!r} ({first_line}): it must be a LoRA for a "
                f"{KINDS[model.kind]} model."
            ) from exc
        parts = frozenset(part for part, module in _components(model) if key in getattr(module, "peft_config", {}))
        if not parts:
            raise ModelLoadError(f"The LoRA {str(file)!r} changes nothing in this model: is it for another kind?")
        model.loras[file.stem] = Adapter(file.stem, key, file, file_hash(file), parts)
    for part, module in _components(model):
        if getattr(module, "peft_config", None):
            _set(part, module, ())
    model.active_loras.clear()
    if model.loras:
        log.info("LoRA adapters of %r: %s", model.name, ", ".join(model.loras))


def _load_file(model: Model, file: Path, key: str) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    mixin: Any = StableDiffusionXLLoraLoaderMixin if model.kind == "sdxl" else StableDiffusionLoraLoaderMixin
    state_dict, alphas, metadata = mixin.lora_state_dict(
        str(file.parent),
        weight_name=file.name,
        unet_config=model.unet.config,
        local_files_only=True,
        return_lora_metadata=True,
    )
    if not all("lora" in name for name in state_dict):
        raise ModelLoadError(f"The file {str(file)!r} is not a LoRA: its tensor names do not say `lora`.")
    with _quiet():
        mixin.load_lora_into_unet(
            state_dict, network_alphas=alphas, unet=model.unet, adapter_name=key, metadata=metadata
        )
    for prefix, encoder in (("text_encoder", model.text_encoder), ("text_encoder_2", model.text_encoder_2)):
        if encoder is not None:
            with _quiet():
                mixin.load_lora_into_text_encoder(
                    state_dict,
                    network_alphas=alphas,
                    text_encoder=encoder,
                    prefix=prefix,
                    adapter_name=key,
                    metadata=metadata,
                )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Several adapters in one model are what we want, yet peft warns of each one after the first, and transformers
    reports the weights of the others as missing (they are loaded): keep both out of the operator's log."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _components(model: Model) -> list[tuple[str, torch.nn.Module]]:
    parts = [("unet", model.unet), ("text_encoder", model.text_encoder), ("text_encoder_2", model.text_encoder_2)]
    return [(part, module) for part, module in parts if module is not None]


def text_loras(model: Model, loras: Loras) -> Loras:
    """The request's adapters that change a text encoder: the prompt embeddings depend on them, and on no other."""
    return tuple((n, w) for n, w in loras if model.loras[n].parts & {"text_encoder", "text_encoder_2"})


def activate_unet(model: Model, loras: Loras) -> None:
    _activate(model, "unet", model.unet, loras)


def activate_text(model: Model, loras: Loras) -> None:
    _activate(model, "text_encoder", model.text_encoder, loras)
    if model.text_encoder_2 is not None:
        _activate(model, "text_encoder_2", model.text_encoder_2, loras)


def _activate(model: Model, part: str, module: torch.nn.Module, loras: Loras) -> None:
    """Turn on exactly `loras` in one component; a no-op when they are on already."""
    if not getattr(module, "peft_config", None):
        return  # no adapter changes this component
    wanted = tuple((model.loras[n].key, w) for n, w in loras if part in model.loras[n].parts)
    if model.active_loras.get(part) != wanted:
        _set(part, module, wanted)
        model.active_loras[part] = wanted


def _set(part: str, module: Any, wanted: tuple[tuple[str, float], ...]) -> None:
    from diffusers.loaders.lora_base import (
        disable_lora_for_text_encoder,
        enable_lora_for_text_encoder,
        set_adapters_for_text_encoder,
    )

    keys, weights = [k for k, _ in wanted], [w for _, w in wanted]
    if part == "unet":
        if wanted:
            module.enable_lora()
            module.set_adapters(keys, weights)
        else:
            module.disable_lora()
    elif wanted:
        enable_lora_for_text_encoder(module)
        set_adapters_for_text_encoder(keys, module, weights)
    else:
        disable_lora_for_text_encoder(module)
