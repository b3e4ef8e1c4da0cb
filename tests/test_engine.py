"""Engine behaviour beyond parity: validation, seeds, prompts, progress, cancellation, model loading."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine import (
    Cancelled,
    CancelToken,
    GenerationRequest,
    InvalidRequest,
    Model,
    ModelLoadError,
    Progress,
    check_inputs,
    generate,
    load_model,
    read_parameters,
)
from sdengine.models import memory_mode_for
from sdengine.prompts import PROMPT_CACHE_SIZE, encode_prompts, to_compel_syntax

BAD_REQUESTS = {
    "empty prompt": GenerationRequest("   "),
    "steps 0": GenerationRequest("x", steps=0),
    "steps 151": GenerationRequest("x", steps=151),
    "guidance -1": GenerationRequest("x", guidance=-1),
    "guidance 31": GenerationRequest("x", guidance=31),
    "guidance nan": GenerationRequest("x", guidance=math.nan),
    "count 0": GenerationRequest("x", count=0),
    "count 5": GenerationRequest("x", count=5),
    "strength 0": GenerationRequest("x", image=b"x", strength=0),
    "strength 1.5": GenerationRequest("x", image=b"x", strength=1.5),
    "width not a multiple": GenerationRequest("x", width=65),
    "height too small": GenerationRequest("x", height=8),
    "width too large": GenerationRequest("x", width=4096),
    "seed negative": GenerationRequest("x", seed=-1),
    "seed too large": GenerationRequest("x", seed=2**32),
    "unknown scheduler": GenerationRequest("x", scheduler="pndm"),
    "NUL in prompt": GenerationRequest("a\x00b"),
    "6000 characters": GenerationRequest("a" * 6000),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_check_inputs_rejects_with_one_sentence(tiny: Model, name: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        check_inputs(tiny, BAD_REQUESTS[name])
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_image_i_uses_seed_plus_i(tiny: Model) -> None:
    batch = generate(tiny, GenerationRequest("a fox", steps=3, seed=10, count=3))
    assert batch.seeds == [10, 11, 12]
    for i, image in enumerate(batch.images):
        alone = generate(tiny, GenerationRequest("a fox", steps=3, seed=10 + i)).images[0]
        assert np.abs(np.asarray(image, np.int16) - np.asarray(alone, np.int16)).max() <= 1
        assert f"Seed: {10 + i}," in (read_parameters(batch.pngs[i]) or "")


def test_missing_seed_is_drawn_and_reported(tiny: Model) -> None:
    result = generate(tiny, GenerationRequest("a fox", steps=2))
    again = generate(tiny, GenerationRequest("a fox", steps=2, seed=result.seeds[0]))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))


def test_progress_and_cancel(tiny: Model) -> None:
    seen: list[Progress] = []
    generate(tiny, GenerationRequest("a fox", steps=6, seed=1), progress=seen.append, preview_every=3)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5, 6] and {p.total for p in seen} == {6}
    assert [p.step for p in seen if p.preview is not None] == [3, 6]
    assert seen[-1].preview is not None and seen[-1].preview.size == (32, 32)  # latent resolution

    token = CancelToken()

    def cancel_at_two(progress: Progress) -> None:
        if progress.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        generate(tiny, GenerationRequest("a fox", steps=50, seed=1), progress=cancel_at_two, cancel=token)


def test_long_prompts_are_chunked_and_reported(tiny: Model) -> None:
    short, notices = encode_prompts(tiny, "a cat", "")
    assert short.shape[:2] == (2, 77) and notices == []
    long_prompt = "a very detailed painting of a cat " * 10  # ~340 byte-level tokens
    embeds, notices = encode_prompts(tiny, long_prompt, "blurry")
    assert embeds.shape[1] > 77 and embeds.shape[1] % 77 == 0
    assert "chunks" in notices[0]
    result = generate(tiny, GenerationRequest(long_prompt, steps=2, seed=1))
    assert result.notices == notices


def test_repeated_prompts_are_encoded_once_and_the_cache_is_bounded(tiny: Model) -> None:
    """Rerolls and variations repeat their prompts: the text encoder runs once per (prompt, negative) pair among
    the last PROMPT_CACHE_SIZE, with the same pixels as a fresh encoding."""
    tiny.prompt_cache.clear()
    calls: list[int] = []
    hook = tiny.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        request = GenerationRequest("a (red:1.2) fox", negative="blurry", steps=2, seed=5)
        first = generate(tiny, request)
        per_pair = len(calls)  # compel runs the encoder once per text
        assert per_pair > 0
        again = generate(tiny, dataclasses.replace(request, seed=6, scheduler="ddim"))
        assert len(calls) == per_pair and again.seeds == [6]
        generate(tiny, dataclasses.replace(request, negative="dark"))  # another pair: encoded
        assert len(calls) == 2 * per_pair

        for i in range(PROMPT_CACHE_SIZE):  # pushes the first pair out, least recently used first
            encode_prompts(tiny, f"prompt {i}", "")
        assert len(tiny.prompt_cache) == PROMPT_CACHE_SIZE and ("a (red:1.2) fox", "blurry") not in tiny.prompt_cache
        calls.clear()
        fresh = generate(tiny, request)
        assert len(calls) == per_pair
        assert np.array_equal(np.asarray(fresh.images[0]), np.asarray(first.images[0]))
    finally:
        hook.remove()
        tiny.prompt_cache.clear()


def test_plain_prompts_match_the_text_encoder_and_compel(tiny: Model) -> None:
    """The fast path is exactly diffusers' encoding, and compel agrees with it on a weight of 1."""
    embeds, _ = encode_prompts(tiny, "a red fox", "")
    ids = tiny.tokenizer(["", "a red fox"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        plain = tiny.text_encoder(ids.input_ids)[0]
    assert torch.equal(embeds, plain)
    through_compel, _ = encode_prompts(tiny, "a red (fox:1.0)", "")
    assert torch.allclose(through_compel, plain, atol=1e-5)


def test_a1111_weights_are_converted_and_change_the_embedding(tiny: Model) -> None:
    assert to_compel_syntax("a (red:1.3) fox, (blue: 0.5)") == "a (red)1.3 fox, (blue)0.5"
    plain, _ = encode_prompts(tiny, "a red fox", "")
    weighted, _ = encode_prompts(tiny, "a (red:1.5) fox", "")
    assert not torch.allclose(plain, weighted)


def test_latent_factor_comes_from_the_vae(factor4_folder: Path) -> None:
    model = load_model(str(factor4_folder), device="cpu")
    assert model.latent_factor == 4 and model.native_size == 128
    result = generate(model, GenerationRequest("x", steps=2, seed=1, width=96, height=64))
    assert result.images[0].size == (96, 64)
    with pytest.raises(InvalidRequest, match="multiple of 4"):
        check_inputs(model, GenerationRequest("x", width=98))


def test_folder_round_trip_gives_the_same_pixels(tiny: Model, tiny_folder: Path) -> None:
    loaded = load_model(str(tiny_folder), device="cpu")
    request = GenerationRequest("a fox", steps=3, seed=3)
    a, b = generate(tiny, request).images[0], generate(loaded, request).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_model_sources_explain_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {
        str(tmp_path / "missing"): "No model at",
        str(tmp_path / "empty"): "not a diffusers model folder",
        str(tmp_path / "broken.safetensors"): "Could not load the checkpoint",
        "nobody/no-such-model": "Could not load 'nobody/no-such-model' from the Hugging Face hub",
    }
    for source, expected in cases.items():
        with pytest.raises(ModelLoadError, match=expected) as error:
            load_model(source, device="cpu")
        assert "\n" not in str(error.value)
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        load_model("tiny", dtype="fp8")


def test_damaged_folder(tiny_folder: Path, tmp_path: Path) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_folder, damaged)
    (damaged / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="damaged"):
        load_model(str(damaged), device="cpu")


def test_request_is_a_value(tiny: Model) -> None:
    request = GenerationRequest("x", seed=1)
    assert dataclasses.replace(request, seed=2) != request
    assert "image" not in repr(GenerationRequest("x", image=b"\x89PNG"))


def test_img2img_size_follows_the_init_image(tiny: Model) -> None:
    """Tiny: native 64 px, sizes snap to 16 px. A 2:1 image keeps 2:1 whichever sides are given."""
    from sdengine.pipeline import _resolve_size

    wide = Image.new("RGB", (128, 64))
    assert _resolve_size(tiny, GenerationRequest("x"), wide) == (96, 48)  # about the native area
    assert _resolve_size(tiny, GenerationRequest("x", width=128), wide) == (128, 64)
    assert _resolve_size(tiny, GenerationRequest("x", height=32), wide) == (64, 32)
    assert _resolve_size(tiny, GenerationRequest("x", width=80, height=80), wide) == (80, 80)
    assert _resolve_size(tiny, GenerationRequest("x"), None) == (64, 64)


def test_a_vae_that_overflows_in_fp16_decodes_again_in_fp32(caplog: pytest.LogCaptureFixture) -> None:
    """A huge first decoder layer overflows fp16 (inf, then NaN through the group norms), never fp32: the picture
    is the fp32 decode of the same latents, the warning says so, and the VAE is back in fp16 afterwards."""
    from sdengine.pipeline import decode, prepare

    model = load_model("tiny", device="cpu", dtype="fp16")
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(2e4 / model.vae.decoder.conv_in.weight.abs().max())  # still < 65504
    samples = prepare(model, GenerationRequest("a fox", steps=1, seed=3)).samples
    latents = samples[0].latents.to(torch.float16) / model.scaling_factor
    with torch.inference_mode():
        assert not torch.isfinite(model.vae.decode(latents).sample).all()  # the overflow is real
        expected = copy.deepcopy(model.vae).float().decode(latents.float()).sample

    with caplog.at_level(logging.WARNING, logger="sdengine.pipeline"):
        (image,) = decode(model, samples)
    assert "decoding again in fp32" in caplog.text
    assert model.vae.dtype == torch.float16
    want = ((expected / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(image), want)


def test_memory_modes_are_checked_and_auto_follows_free_gpu_memory() -> None:
    with pytest.raises(ModelLoadError, match=r"Unknown memory mode 'huge': use auto, fast or low\."):
        load_model("tiny", device="cpu", memory="huge")
    assert load_model("tiny", device="cpu").memory == "fast"  # auto, without a GPU to measure
    assert memory_mode_for("sd1", 2 * 2**30) == "low" and memory_mode_for("sd1", 20 * 2**30) == "fast"
    assert memory_mode_for("sdxl", 6 * 2**30) == "low"  # enough for SD 1.5, not for SDXL at 1024 px
