"""SDXL and SD 2.x (v-prediction) through the hand-written loop match diffusers to at most 1/255 per channel.

Random-weight models (`tiny-xl`, and `tiny-v` for SD 2.x) go through a diffusers folder, which both sides load:
"the same model folder" of the parity contract. Each side gets a fresh scheduler built `from_config`.
"""

from __future__ import annotations

import copy
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from sdengine import SCHEDULERS, GenerationRequest, Model, generate, load_model, save_model
from sdengine.images import fit_image
from sdengine.models import pick_device
from sdengine.pipeline import predict_noise, prepare
from sdengine.schedulers import make_scheduler
from sdengine.tiny import build_components

from .test_parity import _max_diff, _reference_image

PROMPT = "a red spaceship over the sea, oil painting"


Kit = tuple[Model, tuple[Any, Any]]  # sdengine's model and diffusers' txt2img and img2img pipelines, one folder


def _kit(tmp_path_factory: pytest.TempPathFactory, shape: str, pipelines: tuple[Any, Any], **options: Any) -> Kit:
    """Save the random-weight `shape` as a diffusers folder, then load it on both sides, once."""
    device, dtype = pick_device("cpu")
    built = Model(name=shape, device=device, dtype=dtype, **build_components(shape))
    folder = save_model(built, tmp_path_factory.mktemp(shape) / "model")
    txt2img = pipelines[0].from_pretrained(folder, **options)
    img2img = pipelines[1](**{**txt2img.components, **options})
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return load_model(str(folder), device="cpu"), (txt2img, img2img)


@pytest.fixture(scope="module")
def xl_kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    pipelines = (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)
    return _kit(tmp_path_factory, "tiny-xl", pipelines, add_watermarker=False)


@pytest.fixture(scope="module")
def v_kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return _kit(tmp_path_factory, "tiny-v", (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline), **options)


# Every scheduler runs both modes with guidance on and off; with guidance on, one mode has a negative prompt
# and the other none (SDXL: zeros rather than the encoding of "").
CASES = {
    "txt2img-guided": {"mode": "txt2img", "guidance": 7.5, "negative": "blurry"},
    "txt2img-unguided": {"mode": "txt2img", "guidance": 1.0, "negative": ""},
    "img2img-guided": {"mode": "img2img", "guidance": 6.0, "negative": ""},
    "img2img-unguided": {"mode": "img2img", "guidance": 0.0, "negative": "blurry"},
}
WIDTH, HEIGHT = 48, 32  # not square: time ids and latents would show a swap of width and height


def _compare(kit: Kit, scheduler: str, case: dict[str, Any]) -> int:
    """Run one case through sdengine and through diffusers; the largest difference of any channel, in 1/255."""
    model, pipes = kit
    img2img = case["mode"] == "img2img"
    width, height = (HEIGHT, WIDTH) if img2img else (WIDTH, HEIGHT)
    init = _reference_image(3 * width // 2, height) if img2img else None  # wider than the target: it is fitted
    steps = 4 if img2img else 3
    request = GenerationRequest(
        PROMPT,
        negative=case["negative"],
        scheduler=scheduler,
        steps=steps,
        guidance=case["guidance"],
        seed=1234,
        width=width,
        height=height,
        image=init,
        strength=0.6,
    )
    ours = generate(model, request).images[0]

    pipe = pipes[1] if img2img else pipes[0]
    pipe.scheduler = make_scheduler(scheduler, model.scheduler_config)
    kwargs: dict[str, Any] = {
        "negative_prompt": case["negative"] or None,  # no negative prompt, as a diffusers caller writes it
        "num_inference_steps": steps,
        "guidance_scale": case["guidance"],
        "generator": torch.Generator("cpu").manual_seed(1234),
    }
    if img2img:
        assert init is not None
        kwargs.update(image=fit_image(Image.open(io.BytesIO(init)).convert("RGB"), width, height), strength=0.6)
    else:
        kwargs.update(width=width, height=height)
    theirs = pipe(PROMPT, **kwargs).images[0]
    assert ours.size == theirs.size == (width, height)
    return _max_diff(ours, theirs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sdxl_matches_diffusers(xl_kit: Kit, scheduler: str, case: str) -> None:
    assert xl_kit[0].kind == "sdxl"
    assert _compare(xl_kit, scheduler, CASES[case]) <= 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sd2_v_prediction_matches_diffusers(v_kit: Kit, scheduler: str) -> None:
    assert v_kit[0].kind == "sd2" and v_kit[0].prediction_type == "v_prediction"
    assert _compare(v_kit, scheduler, CASES["txt2img-guided"]) <= 1


@pytest.mark.parametrize("scheduler", ["lms", "ddim"])
def test_sd2_v_prediction_img2img_matches_diffusers(v_kit: Kit, scheduler: str) -> None:
    assert _compare(v_kit, scheduler, CASES["img2img-guided"]) <= 1


def test_the_conditioning_changes_the_picture(xl_kit: Kit, v_kit: Kit) -> None:
    """Guard against parity tests that pass because both sides ignore something: guidance, the SDXL negative
    prompt's zeros, the time ids, v-prediction."""
    xl, v_model = xl_kit[0], v_kit[0]
    base = GenerationRequest(PROMPT, steps=2, seed=7, width=WIDTH, height=HEIGHT, scheduler="euler")
    plain = generate(xl, base).images[0]
    assert _max_diff(plain, generate(xl, replace(base, guidance=1.0)).images[0]) > 1
    assert _max_diff(plain, generate(xl, replace(base, negative=" ")).images[0]) > 1  # " " is encoded, "" is zeros

    sample = prepare(xl, base).samples[0]
    assert sample.added_cond is not None
    assert sample.added_cond["time_ids"].tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * 2
    before = predict_noise(xl, [sample])[0]
    sample.added_cond = {**sample.added_cond, "time_ids": sample.added_cond["time_ids"] * 2}
    assert not torch.allclose(before, predict_noise(xl, [sample])[0])

    epsilon = replace(v_model, scheduler_config={**v_model.scheduler_config, "prediction_type": "epsilon"})
    assert _max_diff(generate(v_model, base).images[0], generate(epsilon, base).images[0]) > 1


def test_native_size_comes_from_the_unet(xl_kit: Kit, v_kit: Kit) -> None:
    for model in (xl_kit[0], v_kit[0]):
        assert model.native_size == model.unet.config.sample_size * model.latent_factor == 64
        assert generate(model, GenerationRequest("x", steps=1, seed=1)).images[0].size == (64, 64)


@pytest.mark.parametrize("case", ["txt2img-guided", "img2img-guided"])
def test_sdxl_fp16_decodes_in_fp32_like_diffusers(xl_kit: Kit, case: str, tmp_path: Path) -> None:
    """In fp16, the VAE (`force_upcast` in its config) runs in fp32 on both sides: diffusers upcasts it for each
    call, sdengine keeps it in fp32. Each side loads the folder on its own, since diffusers moves its VAE.

    diffusers loads that VAE in fp16 first, which rounds its weights before the upcast; sdengine loads them in fp32
    as saved. The folder's VAE weights are made exact in fp16, so both sides hold the same weights and only the
    arithmetic is compared."""
    vae = copy.deepcopy(xl_kit[0].vae)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.copy_(parameter.half().float())
    folder = str(save_model(replace(xl_kit[0], vae=vae), tmp_path / "model"))
    model = load_model(folder, device="cpu", dtype="fp16")
    assert model.unet.dtype == torch.float16 and model.vae.dtype == model.vae_dtype == torch.float32
    pipes = tuple(
        cls.from_pretrained(folder, torch_dtype=torch.float16, add_watermarker=False)
        for cls in (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)
    )
    # img2img measures 2/255 here (CPU fp16, cause not pinned down: the encode path; txt2img and every fp32 case
    # hold 1/255).
    assert _compare((model, pipes), "euler", CASES[case]) <= (2 if case.startswith("img2img") else 1)
