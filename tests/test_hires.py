"""The hires fix: equal to diffusers' text-to-image, then its image-to-image on the upscaled result, with the same
seed; sizes, checks, infotext and progress; and the executor runs it beside other jobs to the same pixels."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from sdengine import GenerationRequest, InvalidRequest, Model, Progress, generate, load_model, read_parameters
from sdengine.executor import Executor, ExecutorConfig, Step
from sdengine.schedulers import make_scheduler

from .test_parity import _max_diff, _pipeline_kwargs
from .test_parity_xl import Kit
from .test_parity_xl import xl_kit as xl_kit  # the fixture, shared with the SDXL parity tests

PROMPT = "a red spaceship over the sea, oil painting"
WIDTH, HEIGHT = 64, 48  # not square: a swap of width and height would show


def _hires(upscaler: str, scheduler: str = "dpmpp_2m", **kwargs: Any) -> GenerationRequest:
    fields = {"steps": 4, "seed": 21, "width": WIDTH, "height": HEIGHT, "hires_scale": 2, "hires_steps": 6}
    return GenerationRequest(PROMPT, scheduler=scheduler, hires_upscaler=upscaler, guidance=6.0, **{**fields, **kwargs})


def _diffusers_hires(pipes: tuple[Any, Any], model: Model, request: GenerationRequest) -> Image.Image:
    """A1111's hires fix written with diffusers' pipelines: text-to-image, the upscale, image-to-image."""
    assert request.width and request.height and request.seed is not None and request.hires_scale
    common: dict[str, Any] = {"guidance_scale": request.guidance, "negative_prompt": request.negative or None}
    txt2img, img2img = pipes
    for pipe in pipes:
        pipe.scheduler = make_scheduler(request.scheduler, model.scheduler_config)
    latent = request.hires_upscaler == "latent"
    first = txt2img(
        request.prompt,
        width=request.width,
        height=request.height,
        num_inference_steps=request.steps,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="latent" if latent else "pil",
        **common,
    ).images
    width, height = int(request.width * request.hires_scale), int(request.height * request.hires_scale)
    f = model.latent_factor
    # img2img takes a 4-channel tensor as latents as they are, with no VAE encode
    image = F.interpolate(first, size=(height // f, width // f), mode="bilinear") if latent else None
    if image is None:
        image = first[0].resize((width, height), Image.Resampling.LANCZOS)
    return img2img(  # type: ignore[no-any-return]
        request.prompt,
        image=image,
        strength=request.hires_strength,
        num_inference_steps=request.hires_steps,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        **common,
    ).images[0]


@pytest.fixture(scope="module")
def sd1_kit(tiny_folder: Path) -> Kit:
    kwargs = _pipeline_kwargs(tiny_folder, "ddim")
    pipes = (StableDiffusionPipeline(**kwargs), StableDiffusionImg2ImgPipeline(**kwargs))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return load_model(str(tiny_folder), device="cpu"), pipes


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_hires_matches_diffusers_txt2img_then_img2img(sd1_kit: Kit, upscaler: str, scheduler: str) -> None:
    model, pipes = sd1_kit
    request = _hires(upscaler, scheduler)
    ours = generate(model, request).images[0]
    assert ours.size == (2 * WIDTH, 2 * HEIGHT)
    assert _max_diff(ours, _diffusers_hires(pipes, model, request)) <= 1


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_sdxl_hires_matches_diffusers(xl_kit: Kit, upscaler: str) -> None:
    """SDXL's time ids name the hires size in the second pass, as its img2img pipeline sets them."""
    model, pipes = xl_kit
    request = _hires(upscaler, "euler", width=48, height=32, hires_scale=1.5)
    ours = generate(model, request).images[0]
    assert ours.size == (72, 48)
    assert _max_diff(ours, _diffusers_hires(pipes, model, request)) <= 1


def test_the_second_pass_redraws_the_first(tiny: Model) -> None:
    """Guards the parity tests against a hires pass that does nothing: the result is not the first pass resized,
    the upscalers differ, the strength matters, and the same seed gives the same pixels."""
    request = _hires("lanczos")
    hires = generate(tiny, request).images[0]
    first = generate(tiny, replace(request, hires_scale=None)).images[0]
    assert _max_diff(hires, first.resize(hires.size, Image.Resampling.LANCZOS)) > 8
    assert _max_diff(hires, generate(tiny, replace(request, hires_upscaler="latent")).images[0]) > 8
    assert _max_diff(hires, generate(tiny, replace(request, hires_strength=0.9)).images[0]) > 8
    assert np.array_equal(np.asarray(hires), np.asarray(generate(tiny, request).images[0]))


def test_image_n_of_a_batch_is_its_own_seed_alone(tiny: Model) -> None:
    """What the Upscale n button relies on: image i of a hires batch is the count-1 hires run of seed + i."""
    request = _hires("latent", count=3)
    batch = generate(tiny, request)
    assert batch.seeds == [21, 22, 23]
    alone = generate(tiny, replace(request, count=1, seed=23)).images[0]
    assert _max_diff(batch.images[2], alone) <= 1  # one UNet call of three images rounds a little differently


def test_infotext_carries_a1111_hires_keys_and_progress_counts_both_passes(tiny: Model) -> None:
    steps: list[Progress] = []
    result = generate(tiny, _hires("lanczos", hires_strength=0.5), progress=steps.append)
    # 4 steps, then int(6 * 0.5) = 3 hires steps
    assert [(p.step, p.total) for p in steps] == [(i, 7) for i in range(1, 8)]
    assert (result.width, result.height) == (2 * WIDTH, 2 * HEIGHT)
    parameters = read_parameters(result.pngs[0])
    assert parameters is not None
    assert f"Size: {WIDTH}x{HEIGHT}" in parameters  # the first pass's, as A1111 writes it
    for field in ("Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 6", "Hires upscaler: Lanczos"):
        assert field in parameters
    plain = read_parameters(generate(tiny, replace(_hires("latent"), hires_steps=None)).pngs[0])
    assert plain is not None and "Hires upscaler: Latent" in plain and "Hires steps" not in plain


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"hires_scale": 1.0}, "The hires scale must be above 1 and at most 4, not 1.0."),
        ({"hires_scale": float("nan")}, "The hires scale must be above 1"),
        ({"hires_strength": 0.0}, "The hires strength must be above 0 and at most 1, not 0.0."),
        ({"hires_steps": 0}, "Hires steps must be between 1 and 150, not 0."),
        ({"hires_upscaler": "esrgan"}, "Unknown hires upscaler 'esrgan': use one of latent, lanczos."),
        ({"hires_strength": 0.1, "hires_steps": 5}, "Hires strength 0.1 leaves no steps out of 5"),
        ({"width": 1600, "height": 64}, "Hires 2x of 1600x64 makes 3200x128, over 2048 pixels a side"),
    ],
)
def test_bad_hires_options_get_one_sentence(tiny: Model, change: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequest, match="^" + re.escape(says)):
        generate(tiny, replace(_hires("latent"), **change))


async def test_the_executor_runs_hires_jobs_beside_others_to_the_same_pixels(tiny: Model) -> None:
    quick = {"steps": 2, "hires_steps": 4, "hires_scale": 1.5}
    requests = [
        _hires("latent", count=2, **quick),
        _hires("lanczos", scheduler="ddim", seed=3, **quick),
        _hires("latent", **{**quick, "hires_scale": None}),
    ]
    executor = Executor(tiny, ExecutorConfig(max_batch=8))
    executor.pause()
    jobs = [executor.submit(r, owner=f"user{i}") for i, r in enumerate(requests)]
    executor.pause(False)
    steps = [event async for event in jobs[0].events() if isinstance(event, Step)]
    results = [await job.result() for job in jobs]
    await executor.shutdown()

    assert [(s.step, s.total) for s in steps] == [(i, 4) for i in range(1, 5)]
    for request, result in zip(requests, results, strict=True):
        solo = generate(tiny, request)
        assert (result.width, result.height) == (solo.width, solo.height)
        for a, b in zip(result.images, solo.images, strict=True):
            assert _max_diff(a, b) <= 1
