"""Read the components of a Stable Diffusion 1.x, 2.x or SDXL model from a hub id, a folder, a single file, `tiny` or
`tiny-xl`, as the keyword arguments of `Model` (`load_model` puts them on the device).

The kind of model comes from the folder's `model_index.json` (`_class_name`), or from a single file's tensor
names; a model of any other kind is refused with one sentence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelLoadError
from .request import DEFAULT_MODEL
from .tiny import build_components

# What users call each kind of model.
KINDS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
# Built-in random-weight models (sdengine.tiny) for tests and offline smoke runs.
BUILT_IN = ("tiny", "tiny-xl")


def read_components(source: str, torch_dtype: torch.dtype) -> dict[str, Any]:
    """`Model`'s fields but name, device and dtype, plus `folder` for a folder (where a safety checker may be)."""
    path = Path(source).expanduser()
    if source in BUILT_IN:
        return build_components(source)
    if path.is_dir():
        return _load_folder(path, torch_dtype)
    if path.suffix in (".safetensors", ".ckpt"):
        return _load_single_file(path, torch_dtype)
    if path.exists() or source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1:
        raise ModelLoadError(
            f"No model at {source!r}: give a diffusers folder, a .safetensors file, a hub id like "
            f"{DEFAULT_MODEL!r}, `tiny` or `tiny-xl`."
        )
    return _load_hub(source, torch_dtype)


# model_index.json `_class_name` -> kind; "sd" is 1.x or 2.x, told apart by the UNet's config.
_PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
_SUBFOLDERS = {
    "sd": ("tokenizer", "text_encoder", "unet", "vae", "scheduler"),
    "sdxl": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler"),
}
# Settings of diffusers' SDXL pipelines that change the conditioning.
_PIPELINE_FLAGS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
_UNSUPPORTED = "which sdengine cannot run: use a Stable Diffusion 1.x, 2.x or SDXL model"


def _sd1_or_sd2(unet_config: dict[str, Any]) -> str:
    """SD 2.x UNets use linear projections in their transformer blocks and attend to OpenCLIP's 1024 features."""
    sd2 = unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024
    return "sd2" if sd2 else "sd1"


def _load_folder(path: Path, torch_dtype: torch.dtype) -> dict[str, Any]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{str(path)!r} is not a diffusers model folder (no model_index.json): "
            "point the model at a folder saved with save_pretrained, a .safetensors file, or `tiny`."
        )
    try:
        index = _read_json(index_file)
        family = _PIPELINE_KINDS.get(str(index.get("_class_name")))
        if family is None:
            raise ModelLoadError(f"{str(path)!r} holds a {str(index.get('_class_name'))[:60]} model, {_UNSUPPORTED}.")
        missing = [sub for sub in _SUBFOLDERS[family] if not (path / sub).is_dir()]
        if missing:
            raise ModelLoadError(
                f"{str(path)!r} is not a complete diffusers model folder (missing {', '.join(missing)}): "
                "point the model at a folder saved with save_pretrained, a .safetensors file, or `tiny`."
            )
        kind = "sdxl" if family == "sdxl" else _sd1_or_sd2(_read_json(path / "unet" / "config.json"))
        parts = _from_pretrained(path, torch_dtype, kind)
        parts["scheduler_config"] = _read_json(path / "scheduler" / "scheduler_config.json")
        parts["pipeline_config"] = {k: index[k] for k in _PIPELINE_FLAGS if k in index}
        parts["folder"] = path  # where load_model looks for the optional safety checker
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"The model folder {str(path)!r} is damaged ({first_line(exc)}).") from exc
    return parts


def _from_pretrained(root: Path, torch_dtype: torch.dtype, kind: str) -> dict[str, Any]:
    parts: dict[str, Any] = {
        "kind": kind,
        "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=torch_dtype),
        "unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype),
        "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype),
    }
    if kind == "sdxl":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            root, subfolder="text_encoder_2", dtype=torch_dtype
        )
    return parts


# What a diffusers SD folder needs: configs, tokenizer files, and one full-precision safetensors per model.
_HUB_FILES = ["*.json", "tokenizer/*", "tokenizer_2/*", "*/model.safetensors", "*/diffusion_pytorch_model.safetensors"]


def _load_hub(repo_id: str, torch_dtype: torch.dtype) -> dict[str, Any]:
    """Fetch the files once (or find them in the HF cache), then load them like a local folder."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=_HUB_FILES)
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, gated, disk full
        raise ModelLoadError(
            f"Could not load {repo_id!r} from the Hugging Face hub ({first_line(exc)}): check the network "
            "and the id, or point the model at a local folder or .safetensors file, or use `tiny`."
        ) from exc
    return _load_folder(Path(folder), torch_dtype)


# Tensor-name prefixes of the original (CompVis / Stability AI) checkpoints: each kind's text encoder.
_CHECKPOINT_KINDS = (
    ("conditioner.embedders.1.", "sdxl"),  # SDXL base: CLIP ViT-L and OpenCLIP bigG
    ("cond_stage_model.model.", "sd2"),  # OpenCLIP ViT-H
    ("cond_stage_model.transformer.", "sd1"),  # CLIP ViT-L
)


def checkpoint_kind(path: Path) -> str:
    """The kind of a single-file checkpoint, from its tensor names; only the header is read."""
    try:
        names = _tensor_names(path)
    except Exception as exc:  # a bad header, a truncated file, a pickle that is not a state dict
        raise ModelLoadError(
            f"Could not load the checkpoint {str(path)!r} ({first_line(exc)}): it must be a Stable Diffusion "
            "1.x, 2.x or SDXL .safetensors file."
        ) from exc
    for prefix, kind in _CHECKPOINT_KINDS:
        if any(name.startswith(prefix) for name in names):
            return kind
    raise ModelLoadError(f"The checkpoint {str(path)!r} has no text encoder sdengine knows, {_UNSUPPORTED}.")


def _tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as checkpoint:
            return list(checkpoint.keys())
    # Only tensors, mapped rather than read: weights_only refuses pickled code.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return [str(name) for name in state]


def _load_single_file(path: Path, torch_dtype: torch.dtype) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"No checkpoint file at {str(path)!r}: check the path.")
    kind = checkpoint_kind(path)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    try:
        # transformers has no single-file loader for CLIP, so let diffusers split the checkpoint once,
        # then keep only the components and drop the pipeline object.
        pipe = pipeline_class.from_single_file(str(path), torch_dtype=torch_dtype)
    except Exception as exc:  # wrong shapes, or a config that needs the network
        raise ModelLoadError(
            f"Could not load the checkpoint {str(path)!r} ({first_line(exc)}): it looks like a {KINDS[kind]} "
            "file, and the first load needs the network for its configs."
        ) from exc
    parts = {
        "kind": kind,
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder,
        "unet": pipe.unet,
        "vae": pipe.vae,
        "scheduler_config": dict(pipe.scheduler.config),
    }
    if kind == "sdxl":
        parts["tokenizer_2"] = pipe.tokenizer_2
        parts["text_encoder_2"] = pipe.text_encoder_2
        parts["pipeline_config"] = {k: pipe.config[k] for k in _PIPELINE_FLAGS if k in pipe.config}
    return parts


def _read_json(file: Path) -> dict[str, Any]:
    config = json.loads(file.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{file.name} is not a JSON object")
    return config


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
