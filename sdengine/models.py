"""Load the components of a Stable Diffusion 1.x, 2.x or SDXL model from a hub id, a folder, a single file,
`tiny` or `tiny-xl`.

The kind of model comes from the folder's `model_index.json` (`_class_name`), or from a single file's tensor
names; a model of any other kind is refused with one sentence.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelLoadError
from .kernels import apply_kernels
from .request import DEFAULT_MODEL
from .safety import SafetyChecker
from .tiny import build_components

if TYPE_CHECKING:
    from .lora import Adapter

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What users call each kind of model.
KINDS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
# Built-in random-weight models (sdengine.tiny) for tests and offline smoke runs.
BUILT_IN = ("tiny", "tiny-xl")
# `memory`: "fast" keeps everything on the device whole; "low" slices attention, decodes and encodes the VAE in
# slices and tiles, and keeps the text encoders on the CPU between uses; "auto" picks one from free GPU memory.
MEMORY_MODES = ("auto", "fast", "low")
# "auto" picks "low" when less than this is free once the weights are on the GPU: about a batch of 4 at the
# native size (SD 1.x/2.x at 512-768 px, SDXL at 1024 px), in fp16.
LOW_MEMORY_BELOW = {"sd1": 3 * 2**30, "sd2": 4 * 2**30, "sdxl": 8 * 2**30}


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
    kind: str = "sd1"  # a key of KINDS
    # SDXL only: the second tokenizer and text encoder (OpenCLIP bigG), whose pooled output also conditions the UNet
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    # The pipeline's own settings from model_index.json (SDXL: force_zeros_for_empty_prompt, requires_aesthetics_score)
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    memory: str = "fast"  # "fast" or "low", after "auto" is resolved; see MEMORY_MODES
    compiled: bool = False  # the UNet and the VAE decoder run through torch.compile (sdengine.compiling)
    cuda_graphs: bool = False  # the compiled UNet replays CUDA graphs (sdengine.compiling)
    # The row counts a UNet call is padded up to (a compiled UNet: a few shapes, each one CUDA graph); () for any.
    unet_rows: tuple[int, ...] = ()
    channels_last: bool = False  # the UNet's and the VAE's weights are NHWC (sdengine.kernels)
    fused_qkv: bool = False  # their attention runs on fused q/k/v projections (sdengine.kernels)
    # (prompt, negative, text-encoder LoRAs) -> prompts.PromptEmbeddings, most recent last: rerolls and variations
    # repeat prompts
    prompt_cache: OrderedDict[tuple[Any, ...], Any] = field(default_factory=OrderedDict, repr=False, compare=False)
    # LoRA adapters by name (sdengine.lora), loaded once; and the (peft key, weight) pairs on now, per component
    loras: dict[str, Adapter] = field(default_factory=dict, repr=False, compare=False)
    active_loras: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL: an empty negative prompt is all zeros rather than the encoding of ""."""
        return self.kind == "sdxl" and bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    @property
    def requires_aesthetics_score(self) -> bool:
        """SDXL refiner-style time ids: an aesthetic score instead of the target size."""
        return self.kind == "sdxl" and bool(self.pipeline_config.get("requires_aesthetics_score", False))

    @property
    def vae_dtype(self) -> torch.dtype:
        """SDXL's VAE overflows in fp16: with `force_upcast` in its config it runs in fp32, as diffusers does.
        A fixed VAE (e.g. madebyollin/sdxl-vae-fp16-fix) sets `force_upcast` false and runs in the model's dtype."""
        if self.kind == "sdxl" and self.dtype == torch.float16 and self.vae.config.get("force_upcast", True):
            return torch.float32
        return self.dtype

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
        """The image side the UNet was built for (512 for SD 1.5, 768 for SD 2 768-v, 1024 for SDXL)."""
        return int(self.unet.config.sample_size) * self.latent_factor

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: `epsilon` (the noise) or `v_prediction` (SD 2 768-v)."""
        return str(self.scheduler_config.get("prediction_type", "epsilon"))


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
    source: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    safety_checker: bool = True,
    memory: str = "auto",
    compile: bool = False,
    cuda_graphs: bool = True,
    loras: str = "",
    channels_last: bool | None = None,
    fuse_qkv: bool | None = None,
) -> Model:
    """Load a model from `tiny`, `tiny-xl`, a local diffusers folder, a single .safetensors file, or a hub id.

    With `safety_checker`, a folder's (or hub snapshot's) `safety_checker/` and `feature_extractor/` are loaded too,
    when it has them; the built-in models and single files have none. `memory` is one of MEMORY_MODES. `loras` is
    a folder of LoRA .safetensors files, loaded as adapters (sdengine.lora). `compile` runs the UNet and the VAE
    decoder through torch.compile, warmed up here rather than on a user's first request, and on CUDA replays the
    UNet as CUDA graphs unless `cuda_graphs` is false. `channels_last` and `fuse_qkv` are sdengine.kernels'
    settings; None is auto (on for CUDA).
    """
    if memory not in MEMORY_MODES:
        raise ModelLoadError(f"Unknown memory mode {memory!r}: use auto, fast or low.")
    torch_device, torch_dtype = pick_device(device, dtype)
    path = Path(source).expanduser()
    if source in BUILT_IN:
        parts = build_components(source)
    elif path.is_dir():
        parts = _load_folder(path, torch_dtype)
    elif path.suffix in (".safetensors", ".ckpt"):
        parts = _load_single_file(path, torch_dtype)
    elif path.exists() or source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1:
        raise ModelLoadError(
            f"No model at {source!r}: give a diffusers folder, a .safetensors file, a hub id like "
            f"{DEFAULT_MODEL!r}, `tiny` or `tiny-xl`."
        )
    else:
        parts = _load_hub(source, torch_dtype)
    folder = parts.pop("folder", None)
    model = Model(name=source, device=torch_device, dtype=torch_dtype, **parts)
    if model.kind == "sdxl":
        _check_time_embedding(model)
    for module in (*model.text_encoders, model.unet, model.vae):
        wanted = model.vae_dtype if module is model.vae else torch_dtype
        if module.dtype != wanted:
            module.to(dtype=wanted)
        module.to(torch_device).eval().requires_grad_(False)
    if safety_checker and folder is not None:
        try:
            model.safety_checker = SafetyChecker.load(folder, torch_device, torch_dtype)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"The safety checker in {str(folder)!r} is damaged ({_first_line(exc)}).") from exc
    if loras:
        from .lora import load_adapters

        load_adapters(model, loras)
    set_memory_mode(model, memory)
    apply_kernels(model, channels_last, fuse_qkv)  # after the LoRAs and the memory mode, which decide fusing
    log.info(
        "loaded %s model %r on %s (%s), memory %s, channels_last %s, fused qkv %s",
        model.kind,
        source,
        torch_device,
        torch_dtype,
        model.memory,
        model.channels_last,
        model.fused_qkv,
    )
    if compile:
        from .compiling import compile_model  # imports the pipeline, which imports this module

        compile_model(model, cuda_graphs=cuda_graphs)
    return model


def memory_mode_for(kind: str, free_bytes: int) -> str:
    """What `memory = "auto"` picks on a GPU with `free_bytes` free once the weights are on it."""
    return "low" if free_bytes < LOW_MEMORY_BELOW[kind] else "fast"


def set_memory_mode(model: Model, memory: str) -> None:
    """Set the model up for `memory` (one of MEMORY_MODES); `load_model` does it."""
    if memory == "auto":
        memory = "fast"
        if model.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(model.device)
            memory = memory_mode_for(model.kind, free)
            log.info("memory auto: %.1f GiB free on %s, so %r", free / 2**30, model.device, memory)
    model.memory = memory
    if memory == "low":
        model.unet.set_attention_slice("auto")  # attention in two halves of the heads: lower peak, same result
        model.vae.enable_slicing()  # one image of a batch at a time
        model.vae.enable_tiling()  # overlapping tiles, blended: big images in bounded memory
        for encoder in model.text_encoders:  # brought to the device only to encode (sdengine.prompts)
            encoder.to("cpu")


def _check_time_embedding(model: Model) -> None:
    """SDXL's UNet embeds 6 time ids (5 with an aesthetic score) plus the pooled text embedding."""
    assert model.text_encoder_2 is not None
    ids = 5 if model.requires_aesthetics_score else 6
    passed = model.unet.config.addition_time_embed_dim * ids + model.text_encoder_2.config.projection_dim
    expected = model.unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise ModelLoadError(
            f"The SDXL model {model.name!r} does not fit together: its UNet expects added conditioning of size "
            f"{expected}, but {ids} time ids and the second text encoder give {passed}."
        )


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
        raise ModelLoadError(f"The model folder {str(path)!r} is damaged ({_first_line(exc)}).") from exc
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
            f"Could not load {repo_id!r} from the Hugging Face hub ({_first_line(exc)}): check the network "
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
            f"Could not load the checkpoint {str(path)!r} ({_first_line(exc)}): it must be a Stable Diffusion "
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
            f"Could not load the checkpoint {str(path)!r} ({_first_line(exc)}): it looks like a {KINDS[kind]} "
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def save_model(model: Model, folder: str | Path) -> Path:
    """Write the model as a diffusers folder that both `load_model` and diffusers' pipelines can read."""
    import diffusers

    # The scheduler class the config names, so that its every setting (spacing, sigmas) is written back.
    scheduler_class = getattr(diffusers, str(model.scheduler_config.get("_class_name")), diffusers.PNDMScheduler)
    scheduler = scheduler_class.from_config(model.scheduler_config)
    common = {
        "vae": model.vae,
        "text_encoder": model.text_encoder,
        "tokenizer": model.tokenizer,
        "unet": model.unet,
        "scheduler": scheduler,
    }
    pipe: Any
    if model.kind == "sdxl":
        sdxl = {
            **common,
            "text_encoder_2": model.text_encoder_2,
            "tokenizer_2": model.tokenizer_2,
            "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
            "add_watermarker": False,
        }
        if model.requires_aesthetics_score:  # a setting of the img2img pipeline only
            pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**sdxl, requires_aesthetics_score=True)
        else:
            pipe = diffusers.StableDiffusionXLPipeline(**sdxl)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(folder)
    if model.safety_checker is not None:
        model.safety_checker.save(Path(folder))
    return Path(folder)
