"""A1111's hires fix: a second, image-to-image pass that redraws the first pass's result at a larger size.

    first pass at W x H -> upscale to sW x sH -> image-to-image at `hires_strength` for `hires_steps`, same seed

The upscale is bilinear in latent space ("latent", A1111's default "Latent") or Lanczos in pixels ("lanczos",
decoded and encoded again by the VAE). Drawing big pictures this way keeps the composition the model learned at
its native size, where a first pass at the big size repeats subjects across the frame.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .models import Model
from .request import hires_size
from .sampling import (
    Plan,
    added_conditioning,
    decode,
    img2img_timesteps,
    noised_image_latents,
    to_tensor,
)
from .schedulers import make_scheduler


@torch.inference_mode()
def upscale(model: Model, plan: Plan) -> None:
    """Swap the plan's finished first-pass samples for the hires pass's: the same images, upscaled and noised
    again to the hires pass's first timestep, each with a fresh scheduler and a generator of its own seed."""
    started = time.perf_counter()
    request = plan.request
    assert request.width is not None and request.height is not None and request.hires_scale is not None
    width, height = hires_size(request.width, request.height, request.hires_scale, model.latent_factor)
    steps = request.hires_steps or request.steps
    images = decode(model, plan.samples) if request.hires_upscaler == "lanczos" else None
    samples = []
    for i, first in enumerate(plan.samples):
        generator = torch.Generator("cpu").manual_seed(first.seed)
        scheduler = make_scheduler(request.scheduler, model.scheduler_config)
        scheduler.set_timesteps(steps, device=model.device)
        timesteps = img2img_timesteps(scheduler, steps, request.hires_strength)
        if images is None:
            # (1, C, h, w) -> (1, C, sh, sw): the denoised latents themselves, as A1111's "Latent" upscaler does
            f = model.latent_factor
            latents = F.interpolate(first.latents, size=(height // f, width // f), mode="bilinear")
            noise = randn_tensor(latents.shape, generator=generator, device=model.device, dtype=model.dtype)
            latents = scheduler.add_noise(latents, noise, timesteps[:1])
        else:
            pixels = to_tensor(images[i].resize((width, height), Image.Resampling.LANCZOS), model)
            posterior = model.vae.encode(pixels).latent_dist
            latents = noised_image_latents(model, scheduler, generator, posterior, timesteps[:1])
        added_cond = _resized(model, first.added_cond, width, height)
        samples.append(
            replace(
                first,
                scheduler=scheduler,
                timesteps=timesteps,
                latents=latents,
                added_cond=added_cond,
                generator=generator,
                step=0,
            )
        )
    plan.steps_done += plan.samples[0].total
    plan.hires_steps = 0
    plan.samples = samples
    plan.timings["hires upscale"] = time.perf_counter() - started


def _resized(
    model: Model, added_cond: dict[str, torch.Tensor] | None, width: int, height: int
) -> dict[str, torch.Tensor] | None:
    """SDXL's conditioning for the hires size: its time ids name the size drawn. None for SD 1.x and 2.x."""
    if added_cond is None:
        return None
    pooled = added_cond["text_embeds"]  # (R, P): R is 1 without guidance, else [negative, positive]
    resized = added_conditioning(model, pooled, width, height)
    assert resized is not None
    return {"text_embeds": pooled, "time_ids": resized["time_ids"][-pooled.shape[0] :]}
