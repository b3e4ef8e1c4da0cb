"""A Stable Diffusion 1.x, 2.x or SDXL model on one device: `Model`, and `load_model`, which reads its components
(sdengine.model_files), puts them on the device and sets up its memory mode, kernels and compiling.
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
from .model_files import first_line, read_components
from .request import DEFAULT_MODEL
from .safety import SafetyChecker

if TYPE_CHECKING:
    from .lora import Adapter

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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
    kind: str = "sd1"  # a key of model_files.KINDS
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
    parts = read_components(source, torch_dtype)
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
            raise ModelLoadError(f"The safety checker in {str(folder)!r} is damaged ({first_line(exc)}).") from exc
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
    if compile and model.loras:
        # Each LoRA and weight a request turns on is a new graph to dynamo: it would compile on users' requests.
        log.warning("compile is off for %r: its LoRA adapters would make each request's LoRAs compile anew", source)
    elif compile:
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
