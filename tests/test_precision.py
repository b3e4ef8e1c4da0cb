"""bf16 and fp16 runs of the engine match diffusers' pipelines run in the same dtype, on the CPU, for every scheduler.

Measured on tiny: 0/255 for every scheduler, text-to-image and image-to-image, in both dtypes (the same kernels
run on both sides). The bound is the parity contract's 1/255. For scale, the same bf16 runs differ from fp32 by
4-8/255 and the fp16 ones by 1/255, so an engine that ran in fp32 against a bf16 diffusers would fail here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdengine import SCHEDULERS, GenerationRequest, generate, load_model
from sdengine.models import DTYPES
from tests.test_parity import PROMPT, STEPS, _diffusers_image, _max_diff, _reference_image

MAX_DIFF = 1  # per channel, in /255 units; measured 0


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_matches_diffusers_in_the_same_dtype(
    tiny_folder: Path, dtype: str, scheduler: str, mode: str
) -> None:
    model = load_model(str(tiny_folder), device="cpu", dtype=dtype)
    assert {m.dtype for m in (model.text_encoder, model.unet, model.vae)} == {DTYPES[dtype]}
    width, height = (40, 32) if mode == "txt2img" else (32, 40)  # not square: the sides cannot swap unnoticed
    init = _reference_image(3 * width // 2, height) if mode == "img2img" else None
    request = GenerationRequest(
        PROMPT,
        negative="blurry",
        scheduler=scheduler,
        steps=STEPS,
        guidance=7.5,
        seed=1234,
        width=width,
        height=height,
        image=init,
        strength=0.6,
    )
    ours = generate(model, request).images[0]
    with torch.inference_mode():
        theirs = _diffusers_image(tiny_folder, request, dtype)
    assert _max_diff(ours, theirs) <= MAX_DIFF
