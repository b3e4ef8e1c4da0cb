"""The hand-written Stable Diffusion loop: encode prompt -> latents -> guided UNet loop -> VAE decode.

`generate()` reads top to bottom like diffusers' `StableDiffusionPipeline.__call__`. Its pieces are public
so that the executor can run the UNet loop of many requests in one batch: every image in flight is a
`Sample` with its own scheduler and generator, and `denoise_step` advances any set of samples by one step.

One loop serves every kind of model. SD 2.x differs only in its scheduler config (v-prediction), which the
schedulers read. SDXL adds two things, as `StableDiffusionXLPipeline` does: the UNet also takes the pooled
text embedding and the size "time ids" (`added_cond_kwargs`), and its VAE may run in fp32 (`Model.vae_dtype`).
"""

from __future__ import annotations

import inspect
import logging
import secrets
import time
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .errors import Cancelled, InvalidRequest
from .images import decode_image, fit_image, format_parameters, latents_preview, png_bytes
from .info import check_lora_names, check_sides
from .lora import activate_unet
from .loratags import Loras, check_lora_weights, parse_lora_tags
from .models import Model
from .prompts import encode_prompt_pair
from .request import (
    MAX_SEED,
    SCHEDULERS,
    CancelToken,
    GenerationRequest,
    GenerationResult,
    Progress,
    ProgressCallback,
)
from .schedulers import SAMPLER_NAMES, make_scheduler

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
MAX_SIDE = 2048
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_COUNT = 4
# SDXL refiner-style models condition on an aesthetic score; diffusers' img2img defaults.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def check_inputs(model: Model, request: GenerationRequest) -> None:
    """Reject a request that cannot run, with one sentence that says what to change."""
    if not _visible(request.prompt):
        raise InvalidRequest("The prompt is empty: describe the picture you want.")
    for name, text in (("prompt", request.prompt), ("negative prompt", request.negative)):
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"The {name} has {len(text)} characters: keep it under {MAX_PROMPT_CHARS}.")
        if "\x00" in text:
            raise InvalidRequest(f"The {name} contains a NUL character: remove it.")
    if request.scheduler not in SCHEDULERS:
        # Clipped: the name comes from the user and the sentence must stay short.
        raise InvalidRequest(f"Unknown scheduler {request.scheduler[:40]!r}: use one of {', '.join(SCHEDULERS)}.")
    if not 1 <= request.steps <= MAX_STEPS:
        raise InvalidRequest(f"Steps must be between 1 and {MAX_STEPS}, not {request.steps}.")
    if not 0 <= request.guidance <= MAX_GUIDANCE:  # also rejects NaN
        raise InvalidRequest(f"Guidance must be between 0 and {MAX_GUIDANCE:g}, not {request.guidance}.")
    if not 1 <= request.count <= MAX_COUNT:
        raise InvalidRequest(f"Count must be between 1 and {MAX_COUNT}, not {request.count}.")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise InvalidRequest(f"The seed must be between 0 and {MAX_SEED}, not {request.seed}.")
    if request.image is not None and not 0 < request.strength <= 1:
        raise InvalidRequest(f"Strength must be above 0 and at most 1, not {request.strength}.")
    check_sides(model.latent_factor, request)
    loras = parse_lora_tags(request.prompt)[1]
    check_lora_weights(loras)
    check_lora_names(model.loras, loras)


def _visible(text: str) -> bool:
    """Whether `text` has a character that shows: zero-width spaces, joiners and bidi controls (category Cf) do not."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


@dataclass
class Sample:
    """One image in flight through the UNet loop, with its own scheduler and random generator."""

    seed: int
    generator: torch.Generator
    scheduler: SchedulerMixin
    timesteps: torch.Tensor  # the timesteps this image runs, in order
    latents: torch.Tensor  # (1, C, H/f, W/f)
    embeds: torch.Tensor  # (2, T, D) as [negative, positive]; (1, T, D) positive only without guidance
    guidance: float
    # SDXL: `text_embeds` (R, P) and `time_ids` (R, 6), with the same R rows as `embeds`; None for SD 1.x/2.x
    added_cond: dict[str, torch.Tensor] | None = None
    loras: Loras = ()  # the LoRA adapters on in its UNet calls, as (name, weight)
    step: int = 0

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total


@dataclass
class Plan:
    """A request made ready to run: sizes resolved, prompts encoded, one `Sample` per image."""

    request: GenerationRequest  # with seed, width and height filled in
    samples: list[Sample]
    notices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def prepare(model: Model, request: GenerationRequest) -> Plan:
    """Steps 1-5 of generation: validate, decode the init image, encode prompts, draw the latents."""
    started = time.perf_counter()
    # 1. Check inputs
    check_inputs(model, request)
    init_image = decode_image(request.image) if request.image is not None else None
    width, height = _resolve_size(model, request, init_image)
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    request = replace(request, seed=seed, width=width, height=height)

    # 2. Encode the prompts, without their LoRA tags: (2, T, D) as [negative, positive], and SDXL's added conditioning
    text, loras = parse_lora_tags(request.prompt)
    with torch.inference_mode():
        encoded = encode_prompt_pair(model, text, request.negative, loras)
        embeds, added_cond = encoded.embeds, _added_conditioning(model, encoded.pooled, width, height)
        if request.guidance <= 1:  # diffusers skips the unconditional pass at guidance <= 1
            embeds = embeds[1:]
            added_cond = {name: rows[1:] for name, rows in added_cond.items()} if added_cond else None

        # 3. Encode the init image: (1, 3, H, W) in [-1, 1] -> latent distribution
        posterior = None
        if init_image is not None:
            pixels = _to_tensor(fit_image(init_image, width, height), model)
            posterior = model.vae.encode(pixels).latent_dist

        # 4. One scheduler, generator and latent tensor per image; image i uses seed + i
        samples = []
        for i in range(request.count):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            scheduler = make_scheduler(request.scheduler, model.scheduler_config)
            scheduler.set_timesteps(request.steps, device=model.device)
            if posterior is None:
                timesteps = scheduler.timesteps
                latents = _initial_noise(model, scheduler, generator, width, height)
            else:
                timesteps = _img2img_timesteps(scheduler, request.steps, request.strength)
                latents = _noised_image_latents(model, scheduler, generator, posterior, timesteps[:1])
            samples.append(
                Sample(seed + i, generator, scheduler, timesteps, latents, embeds, request.guidance, added_cond, loras)
            )
    return Plan(request, samples, encoded.notices, {"prepare": time.perf_counter() - started})


def _added_conditioning(
    model: Model, pooled: torch.Tensor | None, width: int, height: int
) -> dict[str, torch.Tensor] | None:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): the pooled text embedding, and the time ids
    (original size, crop top-left (0, 0), target size) with both sizes the requested one; a refiner-style model
    takes an aesthetic score in place of the target size. None for SD 1.x and 2.x."""
    if pooled is None:
        return None
    size = (height, width)
    rows: list[tuple[float, ...]]
    if model.requires_aesthetics_score:
        rows = [(*size, 0, 0, NEGATIVE_AESTHETIC_SCORE), (*size, 0, 0, AESTHETIC_SCORE)]
    else:
        rows = [(*size, 0, 0, *size)] * 2
    time_ids = torch.tensor(rows, dtype=model.dtype, device=model.device)  # (2, 6 or 5) as [negative, positive]
    return {"text_embeds": pooled, "time_ids": time_ids}


def _resolve_size(model: Model, request: GenerationRequest, image: Image.Image | None) -> tuple[int, int]:
    """Missing sides come from the model's native size; with an init image, they keep its aspect ratio
    (one side given: the other follows it; none given: about the native area)."""
    native = model.native_size
    if image is None or (request.width and request.height):
        return request.width or native, request.height or native
    step = 8 * model.latent_factor
    aspect = image.width / image.height

    def snap(side: float) -> int:
        return min(MAX_SIDE, max(step, round(side / step) * step))

    if request.width:
        return request.width, snap(request.width / aspect)
    if request.height:
        return snap(request.height * aspect), request.height
    return snap(native * aspect**0.5), snap(native / aspect**0.5)


def _to_tensor(image: Image.Image, model: Model) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) in [-1, 1], as diffusers' VaeImageProcessor does it, in the VAE's dtype."""
    array = np.asarray(image, dtype=np.float32)[None] / 255.0  # (1, H, W, 3)
    # Permuted with the batch axis in place, as diffusers does: these strides make the VAE's convolutions run
    # channels-last, whose rounding differs from contiguous by a bf16 ulp that grows into several /255 levels.
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    # Through the model's dtype first, as diffusers rounds the pixels before it upcasts them for an fp32 VAE.
    return (tensor * 2 - 1).to(device=model.device, dtype=model.dtype).to(model.vae_dtype)


def _initial_noise(
    model: Model, scheduler: SchedulerMixin, generator: torch.Generator, width: int, height: int
) -> torch.Tensor:
    f = model.latent_factor
    shape = (1, model.latent_channels, height // f, width // f)  # (1, C, H/f, W/f)
    # Drawn on the CPU generator and then moved, so a seed gives the same picture on every device.
    noise: torch.Tensor = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    return noise.mul(scheduler.init_noise_sigma)


def _img2img_timesteps(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """Skip the first (1 - strength) of the schedule: the image already stands in for those steps."""
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps: torch.Tensor = scheduler.timesteps[t_start * scheduler.order :]
    if len(timesteps) == 0:
        raise InvalidRequest(f"Strength {strength:g} leaves no steps out of {steps}: raise the strength or the steps.")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def _noised_image_latents(
    model: Model, scheduler: SchedulerMixin, generator: torch.Generator, posterior: Any, t: torch.Tensor
) -> torch.Tensor:
    # Same draw order as diffusers: first the VAE posterior sample, then the noise.
    latents = posterior.sample(generator).to(model.dtype) * model.scaling_factor  # (1, C, H/f, W/f)
    noise = randn_tensor(latents.shape, generator=generator, device=model.device, dtype=model.dtype)
    noised: torch.Tensor = scheduler.add_noise(latents, noise, t)  # q(x_t | x_0), DDPM eq. 4
    return noised


_STEP_KWARGS: dict[type, set[str]] = {}


def _step_kwargs(sample: Sample) -> dict[str, Any]:
    """`eta` and `generator` for the schedulers whose `step` takes them (DDIM, Euler a)."""
    cls = type(sample.scheduler)
    if cls not in _STEP_KWARGS:
        _STEP_KWARGS[cls] = set(inspect.signature(cls.step).parameters)
    accepted = _STEP_KWARGS[cls]
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = sample.generator
    return kwargs


@torch.inference_mode()
def predict_noise(model: Model, samples: list[Sample]) -> list[torch.Tensor]:
    """The guided noise prediction of every sample at its own current timestep. Changes no sample; turns on each
    group's LoRA adapters in the UNet for its call.

    Samples that share LoRA adapters (and weights), latent and prompt shapes share one UNet call; the rest get one
    call per group.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(call_key(sample), []).append(i)
    predictions: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    for indices in groups.values():
        group = [samples[i] for i in indices]
        activate_unet(model, group[0].loras)
        inputs, times = [], []
        for s in group:
            t = s.timesteps[s.step]
            rows = s.embeds.shape[0]  # 2 with guidance: [negative, positive]
            inputs.append(s.scheduler.scale_model_input(torch.cat([s.latents] * rows), t))
            times.append(t.float().expand(rows))
        # (R, C, h, w), (R,), (R, T, D) -> (R, C, h, w), where each sample owns 1 or 2 rows
        noise = model.unet(
            torch.cat(inputs),
            torch.cat(times).to(model.device),
            encoder_hidden_states=torch.cat([s.embeds for s in group]),
            added_cond_kwargs=_added_rows(group),
        ).sample
        row = 0
        for i, s in zip(indices, group, strict=True):
            pred = noise[row : row + s.embeds.shape[0]]
            row += s.embeds.shape[0]
            if s.embeds.shape[0] == 2:  # classifier-free guidance: uncond + g * (cond - uncond)
                uncond, cond = pred.chunk(2)
                pred = uncond + s.guidance * (cond - uncond)
            predictions[i] = pred
    return predictions


def call_key(sample: Sample) -> tuple[Any, ...]:
    """Samples with equal keys may share a UNet call: the same adapters at the same weights, the same shapes."""
    return (sample.loras, *sample.latents.shape, sample.embeds.shape[1])


def _added_rows(group: list[Sample]) -> dict[str, torch.Tensor] | None:
    """The group's SDXL conditioning, stacked row for row like its prompt embeddings."""
    first = group[0].added_cond
    if first is None:
        return None
    return {name: torch.cat([s.added_cond[name] for s in group if s.added_cond is not None]) for name in first}


@torch.inference_mode()
def advance(sample: Sample, noise_pred: torch.Tensor) -> None:
    """Let the sample's own scheduler take its step from the predicted noise."""
    t = sample.timesteps[sample.step]
    sample.latents = sample.scheduler.step(noise_pred, t, sample.latents, **_step_kwargs(sample), return_dict=False)[0]
    sample.step += 1


def denoise_step(model: Model, samples: list[Sample]) -> None:
    """Advance every sample by one step."""
    for sample, noise_pred in zip(samples, predict_noise(model, samples), strict=True):
        advance(sample, noise_pred)


@torch.inference_mode()
def decode(model: Model, samples: list[Sample]) -> list[Image.Image]:
    """VAE-decode finished samples (of one latent size) in one call."""
    # In fp32 for an SDXL VAE that overflows in fp16
    latents = torch.cat([s.latents for s in samples]).to(model.vae_dtype) / model.scaling_factor  # (N, C, h, w)
    pixels = model.vae.decode(latents).sample  # (N, 3, H, W) in [-1, 1]
    if model.vae_dtype != torch.float32 and not torch.isfinite(pixels).all():
        pixels = _decode_in_fp32(model, latents)
    pixels = (pixels / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


def _decode_in_fp32(model: Model, latents: torch.Tensor) -> torch.Tensor:
    """The VAE overflowed in half precision (inf, then NaN: a black or noisy picture). Decode again in fp32, with
    the VAE upcast for this call only, as diffusers' `upcast_vae` does."""
    log.warning("the VAE overflowed in %s on %s: decoding again in fp32", model.vae_dtype, model.device)
    model.vae.to(torch.float32)
    try:
        pixels: torch.Tensor = model.vae.decode(latents.float()).sample
    finally:
        model.vae.to(model.vae_dtype)
    return pixels


def preview(sample: Sample) -> Image.Image:
    return latents_preview(sample.latents[0])


def finish(model: Model, plan: Plan, images: list[Image.Image]) -> GenerationResult:
    """Wrap decoded images as PNGs that carry their parameters, and flag them with the safety checker if asked."""
    request = plan.request
    assert request.width is not None and request.height is not None
    pngs = []
    for sample, image in zip(plan.samples, images, strict=True):
        parameters = format_parameters(
            prompt=request.prompt,
            negative=request.negative,
            steps=request.steps,
            sampler=SAMPLER_NAMES[request.scheduler],
            guidance=request.guidance,
            seed=sample.seed,
            width=request.width,
            height=request.height,
            model=model.name,
            strength=request.strength if request.image is not None else None,
            lora_hashes={name: model.loras[name].hash for name, _weight in plan.samples[0].loras},
        )
        pngs.append(png_bytes(image, parameters))
    checker = model.safety_checker
    nsfw = checker.check(images) if checker is not None and request.safety_check else [False] * len(images)
    return GenerationResult(
        images=images,
        pngs=pngs,
        seeds=[s.seed for s in plan.samples],
        width=request.width,
        height=request.height,
        model=model.name,
        scheduler=request.scheduler,
        timings=dict(plan.timings),
        notices=list(plan.notices),
        nsfw=nsfw,
    )


def generate(
    model: Model,
    request: GenerationRequest,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    preview_every: int = 5,
) -> GenerationResult:
    """Run one request from prompt to PNGs, all of its images in one batch."""
    # 1-5. Validate, encode the prompts and the init image, draw the latents
    plan = prepare(model, request)
    samples = plan.samples

    # 6. Denoising loop
    started = time.perf_counter()
    total = samples[0].total
    for step in range(1, total + 1):
        if cancel is not None and cancel.cancelled:
            raise Cancelled("The request was cancelled.")
        denoise_step(model, samples)
        if progress is not None:
            show = step % preview_every == 0 or step == total
            progress(Progress(step, total, preview(samples[0]) if show else None))
    plan.timings["denoise"] = time.perf_counter() - started

    # 7. Decode the latents with the VAE
    started = time.perf_counter()
    images = decode(model, samples)
    plan.timings["decode"] = time.perf_counter() - started
    return finish(model, plan, images)
