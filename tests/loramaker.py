"""Random LoRA files for tests, made with peft as a trainer would and saved in diffusers' LoRA format."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from sdengine import load_model

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(model_source: str, file: Path, *, seed: int, rank: int = 4, text: bool = True) -> Path:
    """A LoRA for the model at `model_source` with random non-zero weights on the UNet's attention projections
    and, with `text`, the text encoders' ones, written to `file` (a .safetensors path)."""
    model = load_model(model_source, device="cpu", safety_checker=False)
    generator = torch.Generator("cpu").manual_seed(seed)
    layers: dict[str, dict[str, torch.Tensor]] = {
        "unet_lora_layers": _adapter(model.unet, UNET_TARGETS, rank, generator)
    }
    if text:
        layers["text_encoder_lora_layers"] = _adapter(model.text_encoder, TEXT_TARGETS, rank, generator)
        if model.text_encoder_2 is not None:
            layers["text_encoder_2_lora_layers"] = _adapter(model.text_encoder_2, TEXT_TARGETS, rank, generator)
    pipeline = StableDiffusionXLPipeline if model.kind == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(str(file.parent), weight_name=file.name, **layers)  # type: ignore[arg-type]
    return file


def _adapter(
    module: torch.nn.Module, targets: list[str], rank: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    # peft itself rather than `add_adapter`: transformers gates its own on a newer peft than diffusers needs
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), module)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:  # small enough that the picture changes without blowing up
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    state: dict[str, torch.Tensor] = get_peft_model_state_dict(module)
    return state
