"""Kinds of model (SD 1.x, SD 2.x, SDXL): how they are recognised and loaded, SDXL prompts, `tiny-xl` on the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdengine import GenerationRequest, Model, ModelLoadError, generate, load_model, read_parameters, save_model
from sdengine.cli import main as cli_main
from sdengine.model_files import checkpoint_kind
from sdengine.models import pick_device
from sdengine.prompts import encode_prompt_pair
from sdengine.tiny import build_components


@pytest.fixture(scope="module")
def tiny_xl() -> Model:
    return load_model("tiny-xl", device="cpu")


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory: pytest.TempPathFactory, tiny_xl: Model) -> Path:
    return save_model(tiny_xl, tmp_path_factory.mktemp("xl") / "model")


def test_built_in_models_say_what_they_are(tiny: Model, tiny_xl: Model) -> None:
    assert (tiny.kind, tiny.native_size, tiny.text_encoder_2) == ("sd1", 64, None)
    assert (tiny_xl.kind, tiny_xl.native_size) == ("sdxl", 64)
    assert tiny_xl.tokenizer_2 is not None and tiny_xl.text_encoder_2 is not None
    # Same seeding as `tiny`: built twice, the weights are the same.
    again = build_components("tiny-xl")["unet"].state_dict()
    assert all(torch.equal(again[k], v) for k, v in tiny_xl.unet.state_dict().items())


def test_kind_comes_from_model_index(tiny_folder: Path, xl_folder: Path, tmp_path: Path) -> None:
    assert load_model(str(tiny_folder), device="cpu").kind == "sd1"
    assert json.loads((xl_folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    loaded = load_model(str(xl_folder), device="cpu")
    assert loaded.kind == "sdxl" and loaded.force_zeros_for_empty_prompt
    device, dtype = pick_device("cpu")
    v = save_model(Model(name="v", device=device, dtype=dtype, **build_components("tiny-v")), tmp_path / "v")
    assert load_model(str(v), device="cpu").kind == "sd2"


def test_a_folder_of_another_kind_is_refused_in_one_sentence(tiny_folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "flux"
    shutil.copytree(tiny_folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="holds a FluxPipeline model, which sdengine cannot run") as error:
        load_model(str(other), device="cpu")
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_an_sdxl_folder_without_its_second_encoder_is_refused(xl_folder: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(xl_folder, partial)
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(ModelLoadError, match=r"missing text_encoder_2\)"):
        load_model(str(partial), device="cpu")


@pytest.mark.parametrize(
    ("tensor", "kind"),
    [
        ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
        ("cond_stage_model.model.ln_final.weight", "sd2"),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
    ],
)
def test_kind_of_a_single_file_comes_from_its_tensor_names(tmp_path: Path, tensor: str, kind: str) -> None:
    file = tmp_path / "model.safetensors"
    save_file({tensor: torch.zeros(1), "model.diffusion_model.out.0.weight": torch.zeros(1)}, file)
    assert checkpoint_kind(file) == kind


def test_a_single_file_of_another_kind_is_refused_in_one_sentence(tmp_path: Path) -> None:
    file = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)}, file)
    with pytest.raises(ModelLoadError, match="has no text encoder sdengine knows") as error:
        load_model(str(file), device="cpu")
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_sdxl_vae_runs_in_fp32_only_where_its_config_asks() -> None:
    device = torch.device("cpu")
    half = Model(name="x", device=device, dtype=torch.float16, **build_components("tiny-xl"))
    assert half.vae_dtype == torch.float32
    half.vae.register_to_config(force_upcast=False)  # a fixed VAE, like madebyollin/sdxl-vae-fp16-fix
    assert half.vae_dtype == torch.float16
    sd1 = Model(name="t", device=device, dtype=torch.float16, **build_components("tiny"))
    assert sd1.vae_dtype == torch.float16  # StableDiffusionPipeline never upcasts


def test_sdxl_prompts_through_compel_agree_with_the_plain_path(tiny_xl: Model) -> None:
    plain = encode_prompt_pair(tiny_xl, "a red fox", "blurry")
    assert plain.pooled is not None and plain.embeds.shape == (2, 77, 64) and plain.pooled.shape == (2, 32)
    weighted_by_one = encode_prompt_pair(tiny_xl, "a red (fox:1.0)", "blurry")  # compel's path
    assert weighted_by_one.pooled is not None
    assert torch.allclose(weighted_by_one.embeds, plain.embeds, atol=1e-5)
    assert torch.allclose(weighted_by_one.pooled, plain.pooled, atol=1e-5)
    assert not torch.allclose(encode_prompt_pair(tiny_xl, "a (red:1.5) fox", "blurry").embeds, plain.embeds)


def test_sdxl_empty_negative_is_zeros_and_long_prompts_are_chunked(tiny_xl: Model) -> None:
    empty = encode_prompt_pair(tiny_xl, "a red fox", "")
    assert empty.pooled is not None
    assert not empty.embeds[0].any() and not empty.pooled[0].any() and empty.embeds[1].any()
    long_prompt = "a very detailed painting of a cat " * 10  # ~340 byte-level tokens
    encoded = encode_prompt_pair(tiny_xl, long_prompt, "")
    assert encoded.embeds.shape[1] > 77 and encoded.embeds.shape[1] % 77 == 0
    assert encoded.pooled is not None and encoded.pooled.shape == (2, 32) and not encoded.embeds[0].any()
    result = generate(tiny_xl, GenerationRequest(long_prompt, steps=1, seed=1, width=32, height=32))
    assert result.notices == encoded.notices and "chunks" in result.notices[0]


def test_cli_runs_tiny_xl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fox.png"
    args = ["imagine", "a fox", "--model", "tiny-xl", "--device", "cpu", "--steps", "2", "--seed", "5"]
    code = cli_main([*args, "--width", "48", "--height", "32", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (48, 32)
    assert "Model: tiny-xl" in (read_parameters(out.read_bytes()) or "")
