"""LoRA adapters in the engine: loaded once from a model's folder, switched per request and per UNet call."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdengine import GenerationRequest, InvalidRequest, Model, ModelLoadError, generate, load_model
from sdengine.executor import Executor, ExecutorConfig
from sdengine.images import read_parameters
from sdengine.info import check_for_model, describe
from sdengine.prompts import encode_prompt_pair

from .loramaker import make_lora


@pytest.fixture(scope="session")
def lora_folder(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    """alpha and beta change the UNet and the text encoder; gamma only the UNet."""
    folder = tmp_path_factory.mktemp("loras")
    make_lora(str(tiny_folder), folder / "alpha.safetensors", seed=1)
    make_lora(str(tiny_folder), folder / "beta.safetensors", seed=2)
    make_lora(str(tiny_folder), folder / "gamma.safetensors", seed=3, text=False)
    return folder


@pytest.fixture(scope="module")
def model(tiny_folder: Path, lora_folder: Path) -> Model:
    return load_model(str(tiny_folder), device="cpu", loras=str(lora_folder))


def request(prompt: str, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt, **{"steps": 2, "seed": 3, "width": 32, "height": 32, **kwargs})


def pixels(model: Model, prompt: str) -> np.ndarray:
    return np.asarray(generate(model, request(prompt)).images[0], dtype=np.int16)


def test_adapters_are_named_by_file_stem_with_their_hashes(model: Model, lora_folder: Path) -> None:
    assert sorted(model.loras) == ["alpha", "beta", "gamma"]
    alpha = model.loras["alpha"]
    assert alpha.hash == hashlib.sha256((lora_folder / "alpha.safetensors").read_bytes()).hexdigest()[:12]
    assert alpha.parts == {"unet", "text_encoder"}
    assert model.loras["gamma"].parts == {"unet"}
    assert describe(model).loras == ("alpha", "beta", "gamma")


def test_unknown_adapter_is_refused_with_one_sentence(model: Model) -> None:
    for check in (lambda r: generate(model, r), lambda r: check_for_model(describe(model), r)):
        with pytest.raises(InvalidRequest, match=r"^Unknown LoRA 'nope': this model has alpha, beta, gamma\.$"):
            check(request("a cat <lora:nope:0.5>"))


def test_a_lora_folder_that_is_missing_fails_the_load(tiny_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_model(str(tiny_folder), device="cpu", loras=str(tmp_path / "missing"))


def test_adapters_change_the_picture_and_go_off_again(model: Model) -> None:
    plain = pixels(model, "a cat")
    with_alpha = pixels(model, "a cat <lora:alpha:0.8>")
    assert np.abs(plain - with_alpha).max() > 10
    assert np.array_equal(pixels(model, "a cat"), plain)  # nothing left on from the request before
    assert np.array_equal(pixels(model, "a cat <lora:alpha:0.8> <lora:beta:0>"), with_alpha)


def test_text_encoder_adapters_key_the_prompt_cache(model: Model) -> None:
    plain = encode_prompt_pair(model, "a dog", "")
    alpha = encode_prompt_pair(model, "a dog", "", (("alpha", 1.0),))
    assert not np.allclose(plain.embeds.numpy(), alpha.embeds.numpy())
    assert encode_prompt_pair(model, "a dog", "", (("alpha", 0.5),)).embeds is not alpha.embeds
    # gamma changes only the UNet: the embeddings are the plain ones, from the cache
    assert encode_prompt_pair(model, "a dog", "", (("gamma", 1.0),)).embeds is plain.embeds


def test_infotext_keeps_the_tags_and_adds_lora_hashes(model: Model) -> None:
    result = generate(model, request("a cat <lora:alpha:0.8>, <lora:gamma>"))
    text = read_parameters(result.pngs[0])
    assert text is not None
    hashes = f'Lora hashes: "alpha: {model.loras["alpha"].hash}, gamma: {model.loras["gamma"].hash}"'
    assert text.startswith("a cat <lora:alpha:0.8>, <lora:gamma>\n") and hashes in text


async def test_different_adapter_sets_batched_give_solo_pixels(model: Model) -> None:
    prompts = ["a cat", "a cat <lora:alpha:0.8>", "a cat <lora:alpha:0.8><lora:beta:-1>", "a cat <lora:alpha:1>"]
    solo = [pixels(model, p) for p in prompts]
    calls: list[tuple[Any, ...]] = []
    forward = model.unet.forward

    def counting(sample: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(model.active_loras.get("unet", ())))
        return forward(sample, *args, **kwargs)

    executor = Executor(model, ExecutorConfig(max_batch=8))
    executor.pause()
    jobs = [executor.submit(request(p), owner=str(i)) for i, p in enumerate(prompts)]
    model.unet.forward = counting
    try:
        executor.pause(False)
        results = await asyncio.gather(*(job.result() for job in jobs))
    finally:
        del model.unet.forward
        await executor.shutdown()
    for result, expected in zip(results, solo, strict=True):  # within rounding, as test_executor's batches
        assert np.abs(np.asarray(result.images[0], dtype=np.int16) - expected).max() <= 1
    assert len(set(calls)) == 4 and len(calls) == 4 * 2  # one call per adapter set and step, none shared


def test_a_lora_for_another_kind_fails_the_load_with_one_line(tiny_folder: Path, tmp_path: Path) -> None:
    make_lora("tiny-xl", tmp_path / "xl.safetensors", seed=1)
    with pytest.raises(
        ModelLoadError, match=r"xl.safetensors' \(.*\): it must be a LoRA for a Stable Diffusion 1.x"
    ) as info:
        load_model(str(tiny_folder), device="cpu", loras=str(tmp_path))
    assert "\n" not in str(info.value)
