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
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from .errors import Cancelled
from .hires import upscale
from .images import decode_image, fit_image, format_parameters, latents_preview, png_bytes
from .info import check_for_model, check_hires_size, describe
from .lora import activate_unet
from .loratags import parse_lora_tags
from .models import Model
from .prompts import encode_prompt_pair
from .request import (
    HIRES_UPSCALERS,
    MAX_SEED,
    MAX_SIDE,
    CancelToken,
    GenerationRequest,
    GenerationResult,
    Progress,
    ProgressCallback,
    hires_steps_run,
)
from .sampling import (
    Plan,
    Sample,
    added_conditioning,
    decode,
    img2img_timesteps,
    initial_noise,
    noised_image_latents,
    to_tensor,
)
from .schedulers import SAMPLER_NAMES, make_scheduler

log = logging.getLogger(__name__)


def check_inputs(model: Model, request: GenerationRequest) -> None:
    """Reject a request that cannot run, with one sentence that says what to change."""
    check_for_model(describe(model), request)


def prepare(model: Model, request: GenerationRequest) -> Plan:
    """Steps 1-5 of generation: validate, decode the init image, encode prompts, draw the latents."""
    started = time.perf_counter()
    # 1. Check inputs
    check_inputs(model, request)
    init_image = decode_image(request.image) if request.image is not None else None
    width, height = _resolve_size(model, request, init_image)
    check_hires_size(model.latent_factor, width, height, request)
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    request = replace(request, seed=seed, width=width, height=height)

    # 2. Encode the prompts, without their LoRA tags: (2, T, D) as [negative, positive], and SDXL's added conditioning
    text, loras = parse_lora_tags(request.prompt)
    with torch.inference_mode():
        encoded = encode_prompt_pair(model, text, request.negative, loras)
        embeds, added_cond = encoded.embeds, added_conditioning(model, encoded.pooled, width, height)
        if request.guidance <= 1:  # diffusers skips the unconditional pass at guidance <= 1
            embeds = embeds[1:]
            added_cond = {name: rows[1:] for name, rows in added_cond.items()} if added_cond else None

        # 3. Encode the init image: (1, 3, H, W) in [-1, 1] -> latent distribution
        posterior = None
        if init_image is not None:
            pixels = to_tensor(fit_image(init_image, width, height), model)
            posterior = model.vae.encode(pixels).latent_dist

        # 4. One scheduler, generator and latent tensor per image; image i uses seed + i
        samples = []
        for i in range(request.count):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            scheduler = make_scheduler(request.scheduler, model.scheduler_config)
            scheduler.set_timesteps(request.steps, device=model.device)
            if posterior is None:
                timesteps = scheduler.timesteps
                latents = initial_noise(model, scheduler, generator, width, height)
            else:
                timesteps = img2img_timesteps(scheduler, request.steps, request.strength)
                latents = noised_image_latents(model, scheduler, generator, posterior, timesteps[:1])
            samples.append(
                Sample(seed + i, generator, scheduler, timesteps, latents, embeds, request.guidance, added_cond, loras)
            )
    hires = hires_steps_run(request) if request.hires_scale is not None else 0
    return Plan(request, samples, encoded.notices, {"prepare": time.perf_counter() - started}, hires)


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
        total = sum(len(i) for i in inputs)
        to = padded_rows(model.unet_rows, total)
        added = _added_rows(group)
        if model.cuda_graphs:  # a new step: the last call's outputs (cloned below) may be written over
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        # (R', C, h, w), (R',), (R', T, D) -> (R', C, h, w): each sample owns 1 or 2 of the first R rows; the R' - R
        # after them repeat the last, and their output is dropped
        noise = model.unet(
            _pad(torch.cat(inputs), to),
            _pad(torch.cat(times).to(model.device), to),
            encoder_hidden_states=_pad(torch.cat([s.embeds for s in group]), to),
            added_cond_kwargs={name: _pad(value, to) for name, value in added.items()} if added else None,
        ).sample[:total]
        if model.cuda_graphs:
            noise = noise.clone()  # out of the graph's memory, which its next replay writes over
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


def padded_rows(sizes: tuple[int, ...], rows: int) -> int:
    """The smallest of `sizes` that holds `rows`; `rows` itself when none does."""
    return min((size for size in sizes if size >= rows), default=rows)


def _pad(rows: torch.Tensor, to: int) -> torch.Tensor:
    """`rows` (R, ...) with its last row repeated up to (to, ...)."""
    if len(rows) >= to:
        return rows
    return torch.cat([rows, rows[-1:].expand(to - len(rows), *rows.shape[1:])])


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


def preview(sample: Sample) -> Image.Image:
    return latents_preview(sample.latents[0])


def finish(model: Model, plan: Plan, images: list[Image.Image]) -> GenerationResult:
    """Wrap decoded images as PNGs that carry their parameters, and flag them with the safety checker if asked."""
    request = plan.request
    assert request.width is not None and request.height is not None
    hires = None
    if request.hires_scale is not None:
        hires = (request.hires_scale, request.hires_steps, HIRES_UPSCALERS[request.hires_upscaler])
    # An img2img pass keeps its own strength in `Denoising strength`; a hires pass of text-to-image uses that key,
    # as A1111 writes it.
    strength = request.strength if request.image is not None else request.hires_strength if hires else None
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
            strength=strength,
            lora_hashes={name: model.loras[name].hash for name, _weight in plan.samples[0].loras},
            hires=hires,
        )
        pngs.append(png_bytes(image, parameters))
    checker = model.safety_checker
    nsfw = checker.check(images) if checker is not None and request.safety_check else [False] * len(images)
    return GenerationResult(
        images=images,
        pngs=pngs,
        seeds=[s.seed for s in plan.samples],
        width=images[0].width,  # the hires size after a hires pass
        height=images[0].height,
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

    # 6. Denoising loop, then the hires pass's, if asked for (sdengine.hires)
    started = time.perf_counter()
    while True:
        while not plan.samples[0].done:
            if cancel is not None and cancel.cancelled:
                raise Cancelled("The request was cancelled.")
            denoise_step(model, plan.samples)
            if progress is not None:
                step, total = plan.progress()
                show = step % preview_every == 0 or step == total
                progress(Progress(step, total, preview(plan.samples[0]) if show else None))
        if not plan.hires_steps:
            break
        upscale(model, plan)
    plan.timings["denoise"] = time.perf_counter() - started

    # 7. Decode the latents with the VAE
    started = time.perf_counter()
    images = decode(model, plan.samples)
    plan.timings["decode"] = time.perf_counter() - started
    return finish(model, plan, images)
