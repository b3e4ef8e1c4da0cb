"""Load the four Stable Diffusion components, one by one, from a hub id, a folder, a single file or `tiny`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .errors import ModelLoadError
from .request import DEFAULT_MODEL
from .safety import SafetyChecker
from .tiny import build_components

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Model:
    """The loaded components of one Stable Diffusion model, on one device."""

    name: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    safety_checker: SafetyChecker | None = None  # from the folder's safety_checker/, when it has one

    @property
    def latent_factor(self) -> int:
        """How many pixels one latent cell covers along each side (8 for SD 1.5)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def native_size(self) -> int:
        """The image side the UNet was built for (512 for SD 1.5)."""
        return int(self.unet.config.sample_size) * self.latent_factor


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` takes CUDA with fp16, then MPS with fp16, then CPU with fp32."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") from exc
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA is not available on this machine: set the device to auto or cpu.")
    if dtype == "auto":
        dtype = "fp32" if torch_device.type == "cpu" else "fp16"
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}: use auto, fp32, fp16 or bf16.")
    return torch_device, DTYPES[dtype]


def load_model(
    source: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto", safety_checker: bool = True
) -> Model:
    """Load a model from `tiny`, a local diffusers folder, a single .safetensors file, or a hub id.

    With `safety_checker`, a folder's (or hub snapshot's) `safety_checker/` and `feature_extractor/` are loaded too,
    when it has them; `tiny` and single files have none.
    """
    torch_device, torch_dtype = pick_device(device, dtype)
    path = Path(source).expanduser()
    if source == "tiny":
        parts = build_components("tiny")
    elif path.is_dir():
        parts = _load_folder(path, torch_dtype)
    elif path.suffix in (".safetensors", ".ckpt"):
        parts = _load_single_file(path, torch_dtype)
    elif path.exists() or source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1:
        raise ModelLoadError(
            f"No model at {source!r}: give a diffusers folder, a .safetensors file, a hub id like "
            f"{DEFAULT_MODEL!r}, or `tiny`."
        )
    else:
        parts = _load_hub(source, torch_dtype)
    folder = parts.pop("folder", None)
    model = Model(name=source, device=torch_device, dtype=torch_dtype, **parts)
    for module in (model.text_encoder, model.unet, model.vae):
        if module.dtype != torch_dtype:
            module.to(dtype=torch_dtype)
        module.to(torch_device).eval().requires_grad_(False)
    if safety_checker and folder is not None:
        try:
            model.safety_checker = SafetyChecker.load(folder, torch_device, torch_dtype)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"The safety checker in {str(folder)!r} is damaged ({_first_line(exc)}).") from exc
    log.info("loaded model %r on %s (%s)", source, torch_device, torch_dtype)
    return model


def _from_pretrained(root: Path, torch_dtype: torch.dtype) -> dict[str, Any]:
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=torch_dtype),
        "unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype),
        "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype),
    }


def _load_folder(path: Path, torch_dtype: torch.dtype) -> dict[str, Any]:
    missing = [sub for sub in ("tokenizer", "text_encoder", "unet", "vae", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{str(path)!r} is not a diffusers model folder (missing {', '.join(missing)}): "
            "point the model at a folder saved with save_pretrained, a .safetensors file, or `tiny`."
        )
    try:
        parts = _from_pretrained(path, torch_dtype)
        parts["scheduler_config"] = _read_scheduler_config(path / "scheduler" / "scheduler_config.json")
        parts["folder"] = path  # where load_model looks for the optional safety checker
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"The model folder {str(path)!r} is damaged ({_first_line(exc)}).") from exc
    return parts


# What a diffusers SD folder needs: configs, tokenizer files, and one full-precision safetensors per model.
_HUB_FILES = ["*.json", "tokenizer/*", "*/model.safetensors", "*/diffusion_pytorch_model.safetensors"]


def _load_hub(repo_id: str, torch_dtype: torch.dtype) -> dict[str, Any]:
    """Fetch the files once (or find them in the HF cache), then load them like a local folder."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=_HUB_FILES)
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, gated, disk full
        raise ModelLoadError(
            f"Could not load {repo_id!r} from the Hugging Face hub ({_first_line(exc)}): check the network "
            "and the id, or point the model at a local folder or .safetensors file, or use `tiny`."
        ) from exc
    return _load_folder(Path(folder), torch_dtype)


def _load_single_file(path: Path, torch_dtype: torch.dtype) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"No checkpoint file at {str(path)!r}: check the path.")
    from diffusers import StableDiffusionPipeline

    try:
        # transformers has no single-file loader for CLIP, so let diffusers split the checkpoint once,
        # then keep only the components and drop the pipeline object.
        pipe = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=torch_dtype)
    except Exception as exc:  # a bad header, wrong keys, or a config that needs the network
        raise ModelLoadError(
            f"Could not load the checkpoint {str(path)!r} ({_first_line(exc)}): it must be a Stable "
            "Diffusion 1.x .safetensors file, and the first load needs the network for its configs."
        ) from exc
    return {
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder,
        "unet": pipe.unet,
        "vae": pipe.vae,
        "scheduler_config": dict(pipe.scheduler.config),
    }


def _read_scheduler_config(file: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(file.read_text())
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def save_model(model: Model, folder: str | Path) -> Path:
    """Write the model as a diffusers folder that both `load_model` and diffusers' pipelines can read."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=PNDMScheduler.from_config(model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    if model.safety_checker is not None:
        model.safety_checker.save(Path(folder))
    return Path(folder)
