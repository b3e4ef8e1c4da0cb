"""The hand-written loop matches diffusers' reference pipelines to at most 1/255 per channel."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from sdengine import SCHEDULERS, GenerationRequest, generate, load_model
from sdengine.images import fit_image
from sdengine.schedulers import make_scheduler

STEPS = 5
PROMPT = "a red spaceship over the sea, oil painting"


def _reference_image(width: int, height: int) -> bytes:
    """A smooth gradient with a disc, so the VAE sees real structure."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, ((x - width / 2) ** 2 + (y - height / 2) ** 2 < 200) * 200])
    buffer = io.BytesIO()
    Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _max_diff(ours: Image.Image, theirs: Image.Image) -> int:
    a = np.asarray(ours, dtype=np.int16)
    b = np.asarray(theirs, dtype=np.int16)
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


def _pipeline_kwargs(folder: Path, scheduler: str, dtype: str = "auto") -> dict[str, Any]:
    model = load_model(str(folder), device="cpu", dtype=dtype)
    return {
        "vae": model.vae,
        "text_encoder": model.text_encoder,
        "tokenizer": model.tokenizer,
        "unet": model.unet,
        "scheduler": make_scheduler(scheduler, model.scheduler_config),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _diffusers_image(folder: Path, request: GenerationRequest, dtype: str = "auto") -> Image.Image:
    """What diffusers' text-to-image or image-to-image pipeline draws for `request` (with its size and seed set)."""
    assert request.width is not None and request.height is not None and request.seed is not None
    kwargs = _pipeline_kwargs(folder, request.scheduler, dtype)
    common: dict[str, Any] = {
        "negative_prompt": request.negative,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
    }
    if request.image is None:
        pipe = StableDiffusionPipeline(**kwargs)
        return pipe(request.prompt, width=request.width, height=request.height, **common).images[0]
    fitted = fit_image(Image.open(io.BytesIO(request.image)).convert("RGB"), request.width, request.height)
    pipe = StableDiffusionImg2ImgPipeline(**kwargs)
    return pipe(request.prompt, image=fitted, strength=request.strength, **common).images[0]


@pytest.fixture(scope="module", params=["tiny_folder", "factor4_folder"])
def folder(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue(request.param)
    return path


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_text_to_image_matches_diffusers(folder: Path, scheduler: str) -> None:
    model = load_model(str(folder), device="cpu")
    step = 8 * model.latent_factor
    width, height = 5 * step, 4 * step  # not square, so width and height cannot be swapped unnoticed
    request = GenerationRequest(
        PROMPT,
        negative="blurry",
        scheduler=scheduler,
        steps=STEPS,
        guidance=7.5,
        seed=1234,
        width=width,
        height=height,
    )
    ours = generate(model, request).images[0]
    assert _max_diff(ours, _diffusers_image(folder, request)) <= 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_image_to_image_matches_diffusers(folder: Path, scheduler: str) -> None:
    model = load_model(str(folder), device="cpu")
    step = 8 * model.latent_factor
    width, height = 4 * step, 5 * step
    init = _reference_image(3 * width // 2, height)  # wider than the target: exercises the fit
    request = GenerationRequest(
        PROMPT,
        negative="blurry",
        scheduler=scheduler,
        steps=STEPS + 3,
        guidance=6.0,
        seed=99,
        width=width,
        height=height,
        image=init,
        strength=0.6,
    )
    ours = generate(model, request).images[0]
    assert _max_diff(ours, _diffusers_image(folder, request)) <= 1


def test_guidance_changes_the_picture(tiny_folder: Path) -> None:
    """Guard against a parity test that passes because guidance is ignored on both sides."""
    model = load_model(str(tiny_folder), device="cpu")
    base = GenerationRequest(PROMPT, steps=STEPS, seed=7, guidance=1.0)
    a = generate(model, base).images[0]
    b = generate(model, GenerationRequest(PROMPT, steps=STEPS, seed=7, guidance=12.0)).images[0]
    assert _max_diff(a, b) > 1


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_low_memory_mode_matches_diffusers_with_sliced_attention_and_a_tiled_vae(tiny_folder: Path, mode: str) -> None:
    """`memory = "low"` at a size past the VAE's tile (64 px for tiny): the same pixels as diffusers with
    `enable_tiling()` and attention slicing, and not the same as the untiled decode, so the tiles did run."""
    low = load_model(str(tiny_folder), device="cpu", memory="low")
    assert low.memory == "low" and low.vae.use_tiling and low.vae.use_slicing
    width, height = 128, 96
    init = _reference_image(width, height) if mode == "img2img" else None
    request = GenerationRequest(
        PROMPT, steps=3, guidance=7.5, seed=21, width=width, height=height, image=init, strength=0.7
    )
    ours = generate(low, request).images[0]

    kwargs = _pipeline_kwargs(tiny_folder, request.scheduler)
    pipe = StableDiffusionImg2ImgPipeline(**kwargs) if init else StableDiffusionPipeline(**kwargs)
    pipe.vae.enable_tiling()
    pipe.unet.set_attention_slice("auto")
    size: dict[str, Any] = {"image": Image.open(io.BytesIO(init)), "strength": 0.7} if init else {}
    if not init:
        size.update(width=width, height=height)
    theirs = pipe(
        PROMPT, num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(21), **size
    ).images[0]
    assert _max_diff(ours, theirs) <= 1

    fast = generate(load_model(str(tiny_folder), device="cpu", memory="fast"), request).images[0]
    assert _max_diff(ours, fast) > 1
