"""Kernel settings (sdengine.kernels): `channels_last` and `fuse_qkv` take effect and leave the pictures alone.

Measured on the CPU in fp32, against the plain model on tiny and tiny-xl, text-to-image and image-to-image (so the VAE
encoder runs too): channels_last draws within 1/255 per channel (convolutions sum in another order), fuse_qkv within
0/255, both together within 1/255.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from PIL import Image

from bot.__main__ import main
from sdengine import GenerationRequest, Model, generate, load_model
from tests.test_lora import lora_folder as lora_folder  # a fixture, shared
from tests.test_parity import PROMPT, _max_diff
from tests.test_startup import write_config

MAX_DIFF = 1  # per channel, in /255 units: the parity contract's bound

SETTINGS = [pytest.param(True, False, id="channels_last"), pytest.param(False, True, id="fuse_qkv")]


def _image_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


REQUESTS = [
    GenerationRequest(PROMPT, negative="blurry", steps=3, seed=11),
    GenerationRequest(PROMPT, steps=4, seed=12, width=64, height=64, image=_image_bytes(), strength=0.6),
]


def _is_channels_last(module: torch.nn.Module) -> bool:
    weights = [p for p in module.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def _is_fused(module: torch.nn.Module) -> bool:
    """Every attention block holds its fused projection and runs the processor that uses it."""
    blocks = [m for m in module.modules() if isinstance(m, Attention)]
    fused = [hasattr(m, "to_kv" if m.is_cross_attention else "to_qkv") for m in blocks]
    return bool(blocks) and all(fused) and all(isinstance(m.processor, FusedAttnProcessor2_0) for m in blocks)


@pytest.fixture(scope="module")
def tiny_xl() -> Model:
    return load_model("tiny-xl", device="cpu")


def test_auto_is_off_on_the_cpu(tiny: Model) -> None:
    assert not tiny.channels_last and not tiny.fused_qkv
    assert not _is_channels_last(tiny.unet) and not _is_fused(tiny.unet)


@pytest.mark.parametrize(("channels_last", "fuse_qkv"), SETTINGS)
@pytest.mark.parametrize("shape", ["tiny", "tiny-xl"])
def test_each_setting_takes_effect_and_draws_what_the_plain_model_draws(
    request: pytest.FixtureRequest, shape: str, channels_last: bool, fuse_qkv: bool
) -> None:
    plain = request.getfixturevalue(shape.replace("-", "_"))
    model = load_model(shape, device="cpu", channels_last=channels_last, fuse_qkv=fuse_qkv)
    assert (model.channels_last, model.fused_qkv) == (channels_last, fuse_qkv)
    for part in (model.unet, model.vae):
        assert _is_channels_last(part) == channels_last
        assert _is_fused(part) == fuse_qkv
    for job in REQUESTS:
        assert _max_diff(generate(model, job).images[0], generate(plain, job).images[0]) <= MAX_DIFF


def _weight_bytes(module: torch.nn.Module) -> int:
    """The memory of a module's weights: each storage once, however many parameters view it."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


def test_fusing_costs_no_memory_and_keeps_the_separate_projections(tiny: Model) -> None:
    """diffusers keeps the separate q/k/v weights beside the fused ones; here they are views of the fused rows."""
    fused = load_model("tiny", device="cpu", fuse_qkv=True)
    for part, plain in ((fused.unet, tiny.unet), (fused.vae, tiny.vae)):
        assert _is_fused(part)
        assert _weight_bytes(part) == _weight_bytes(plain)
        theirs = dict(plain.named_parameters())
        for name, weight in part.named_parameters():
            if name.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v"):
                assert torch.equal(weight, theirs[name]), name


def test_low_memory_keeps_attention_unfused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sdengine")
    model = load_model("tiny", device="cpu", memory="low", fuse_qkv=True)
    assert not model.fused_qkv and not _is_fused(model.unet)
    assert "fuse_qkv is off for 'tiny': memory 'low' slices attention" in caplog.text


def test_a_model_with_loras_keeps_attention_unfused_so_they_still_apply(
    tiny_folder: Path, lora_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fused processor would skip the LoRA layers peft wraps around to_q, to_k and to_v."""
    caplog.set_level(logging.INFO, logger="sdengine")
    asked = load_model(str(tiny_folder), device="cpu", loras=str(lora_folder), fuse_qkv=True, channels_last=True)
    assert not asked.fused_qkv and not _is_fused(asked.unet)
    assert asked.channels_last and _is_channels_last(asked.unet)  # the LoRA layers' conv weights too, if any
    assert "its LoRA adapters change the separate q/k/v projections" in caplog.text
    plain = load_model(str(tiny_folder), device="cpu", loras=str(lora_folder))
    job = GenerationRequest(f"{PROMPT} <lora:gamma:1>", steps=3, seed=11)
    with_lora = generate(asked, job).images[0]
    assert _max_diff(with_lora, generate(plain, job).images[0]) <= MAX_DIFF
    assert _max_diff(with_lora, generate(asked, GenerationRequest(PROMPT, steps=3, seed=11)).images[0]) > MAX_DIFF


def test_the_config_keys_reach_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """[model] channels_last and fuse_qkv go through preflight's ModelSpec and the pool to load_model: `sdbot
    --check` loads the model and names the settings that are on."""
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    config = write_config(tmp_path, 'path = "tiny"\nchannels_last = true\nfuse_qkv = true')
    assert main(["--check", "--config", str(config)]) == 0
    assert "(float32, memory fast, channels_last, fused qkv, without a safety checker)" in capsys.readouterr().out
