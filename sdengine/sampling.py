"""The images in flight and the tensor steps that make and finish them, shared by the pipeline and the hires pass.

A `Sample` is one image on its way through the UNet loop; a `Plan` is a request's samples. The helpers turn pixels
into latents and back, draw the starting noise, and cut the schedule for image-to-image, each as diffusers'
pipelines do it, so that the loop matches them draw for draw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .errors import InvalidRequest
from .loratags import Loras
from .models import Model
from .request import GenerationRequest

log = logging.getLogger(__name__)

# SDXL refiner-style models condition on an aesthetic score; diffusers' img2img defaults.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


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
    hires_steps: int = 0  # steps of a hires pass still to come (sdengine.hires); 0 without one or once it began
    steps_done: int = 0  # steps of the passes before the current one

    def progress(self) -> tuple[int, int]:
        """(step, total) over all of the request's passes."""
        sample = self.samples[0]
        return self.steps_done + sample.step, self.steps_done + sample.total + self.hires_steps


def added_conditioning(
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


def to_tensor(image: Image.Image, model: Model) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) in [-1, 1], as diffusers' VaeImageProcessor does it, in the VAE's dtype."""
    array = np.asarray(image, dtype=np.float32)[None] / 255.0  # (1, H, W, 3)
    # Permuted with the batch axis in place, as diffusers does: these strides make the VAE's convolutions run
    # channels-last, whose rounding differs from contiguous by a bf16 ulp that grows into several /255 levels.
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    # Through the model's dtype first, as diffusers rounds the pixels before it upcasts them for an fp32 VAE.
    return (tensor * 2 - 1).to(device=model.device, dtype=model.dtype).to(model.vae_dtype)


def initial_noise(
    model: Model, scheduler: SchedulerMixin, generator: torch.Generator, width: int, height: int
) -> torch.Tensor:
    f = model.latent_factor
    shape = (1, model.latent_channels, height // f, width // f)  # (1, C, H/f, W/f)
    # Drawn on the CPU generator and then moved, so a seed gives the same picture on every device.
    noise: torch.Tensor = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    return noise.mul(scheduler.init_noise_sigma)


def img2img_timesteps(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """Skip the first (1 - strength) of the schedule: the image already stands in for those steps."""
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps: torch.Tensor = scheduler.timesteps[t_start * scheduler.order :]
    if len(timesteps) == 0:
        raise InvalidRequest(f"Strength {strength:g} leaves no steps out of {steps}: raise the strength or the steps.")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def noised_image_latents(
    model: Model, scheduler: SchedulerMixin, generator: torch.Generator, posterior: Any, t: torch.Tensor
) -> torch.Tensor:
    # Same draw order as diffusers: first the VAE posterior sample, then the noise.
    latents = posterior.sample(generator).to(model.dtype) * model.scaling_factor  # (1, C, H/f, W/f)
    noise = randn_tensor(latents.shape, generator=generator, device=model.device, dtype=model.dtype)
    noised: torch.Tensor = scheduler.add_noise(latents, noise, t)  # q(x_t | x_0), DDPM eq. 4
    return noised


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
