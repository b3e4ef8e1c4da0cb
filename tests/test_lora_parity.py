"""LoRA through the hand-written loop matches diffusers' pipelines with the same adapters at the same weights
(`load_lora_weights` + `set_adapters`) to at most 1/255 per channel, on SD 1.x and SDXL, one adapter and two.

The adapters are random LoRAs made with peft (tests/loramaker.py) on the UNet's and the text encoders' attention
projections, so both the prompt embeddings and the UNet calls must switch them right.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sdengine import GenerationRequest, Model, generate, load_model, save_model
from sdengine.loratags import parse_lora_tags
from sdengine.models import pick_device
from sdengine.schedulers import make_scheduler
from sdengine.tiny import build_components

from .loramaker import make_lora
from .test_parity import _max_diff

STEPS = 3
PROMPTS = {
    "one": "a red spaceship <lora:alpha:0.8>, oil painting",
    "two": "<lora:beta:-1> a red spaceship <lora:alpha:0.8>, oil painting",
}
Kit = tuple[Model, Any]  # sdengine's model and diffusers' pipeline with the same adapters loaded


@pytest.fixture(scope="module", params=["tiny", "tiny-xl"])
def kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    shape: str = request.param
    root = tmp_path_factory.mktemp(f"lora-{shape}")
    device, dtype = pick_device("cpu")
    folder = save_model(Model(name=shape, device=device, dtype=dtype, **build_components(shape)), root / "model")
    loras = root / "loras"
    loras.mkdir()
    for seed, name in enumerate(("alpha", "beta"), start=1):
        make_lora(str(folder), loras / f"{name}.safetensors", seed=seed)
    if shape == "tiny-xl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    for name in ("alpha", "beta"):
        pipe.load_lora_weights(str(loras), weight_name=f"{name}.safetensors", adapter_name=name)
    pipe.set_progress_bar_config(disable=True)
    return load_model(str(folder), device="cpu", loras=str(loras)), pipe


@pytest.mark.parametrize("case", PROMPTS)
def test_lora_matches_diffusers(kit: Kit, case: str) -> None:
    model, pipe = kit
    text, loras = parse_lora_tags(PROMPTS[case])
    request = GenerationRequest(
        PROMPTS[case], negative="blurry", scheduler="euler", steps=STEPS, seed=21, width=48, height=32
    )
    ours = generate(model, request).images[0]

    pipe.set_adapters([name for name, _ in loras], adapter_weights=[weight for _, weight in loras])
    pipe.scheduler = make_scheduler("euler", model.scheduler_config)
    theirs = pipe(
        text,
        negative_prompt="blurry",
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        width=48,
        height=32,
        generator=torch.Generator("cpu").manual_seed(21),
    ).images[0]
    diff = _max_diff(ours, theirs)
    print(f"LoRA parity {model.kind} {case}: max difference {diff}/255")
    assert diff <= 1

    pipe.disable_lora()  # and without them, the pictures differ: the adapters did something
    plain = pipe(
        text,
        negative_prompt="blurry",
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        width=48,
        height=32,
        generator=torch.Generator("cpu").manual_seed(21),
    ).images[0]
    pipe.enable_lora()
    assert _max_diff(ours, plain) > 10
