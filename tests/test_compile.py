"""`compile = true` on the CPU: torch.compile of tiny's UNet and VAE decoder, warmed up at load; and the padded UNet
calls that CUDA graphs replay.

Measured: the compiled tiny draws within 1/255 per channel of the eager one (inductor fuses and reorders float
sums). Inductor costs about a minute a shape with a cold cache, so its test runs one warm-up only; the test of the
full warm-up traces with dynamo alone (backend "eager"), which decides what compiles again.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils
from PIL import Image

from sdengine import GenerationRequest, Model, generate, load_model
from sdengine.compiling import COMPILED_ROWS, GRAPH_ROWS, compile_model, warm_ups
from sdengine.errors import ModelLoadError
from sdengine.pipeline import padded_rows
from tests.test_lora import lora_folder as lora_folder  # a fixture, shared
from tests.test_parity import PROMPT, _max_diff

MAX_DIFF = 2  # per channel, in /255 units; measured 1


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.slow  # about a minute: inductor's frozen graphs skip its cache (prepacked weights do not pickle)
def test_compiled_tiny_is_warmed_up_at_load_and_draws_what_eager_draws(
    tiny: Model, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sdengine")
    compiled = load_model("tiny", device="cpu")
    compile_model(compiled, warm_up=warm_ups(compiled)[:1])  # inductor, one shape
    assert compiled.compiled and not tiny.compiled
    assert not compiled.cuda_graphs and compiled.unet_rows == COMPILED_ROWS  # graphs are for CUDA only
    assert "compiling the UNet and the VAE decoder of 'tiny' on cpu; warm-up generations to run: 1" in caplog.text
    assert "warm-up done in" in caplog.text

    graphs = _unique_graphs()
    assert graphs >= 2  # the UNet's and the decoder's, at least: the compiler did run
    if torch.backends.mkldnn.is_available():  # frozen: the convolutions' weights were prepacked for oneDNN
        assert torch._dynamo.utils.counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] > 0
    request = GenerationRequest(PROMPT, negative="blurry", steps=3, seed=11)  # the warm-up's shapes, another prompt
    ours = generate(compiled, request).images[0]
    assert _unique_graphs() == graphs  # the request compiled nothing
    assert _max_diff(ours, generate(tiny, request).images[0]) <= MAX_DIFF


def test_after_the_warm_ups_no_request_compiles(tiny: Model, caplog: pytest.LogCaptureFixture) -> None:
    """After the warm-ups, other sizes, batches, prompt lengths, a single picture at another size, and a call of one
    row (guidance 1, padded to 2) all reuse the graphs. The model has both kernel settings on, as
    load_model applies them before compiling: the trace goes through the fused attention and the NHWC weights."""
    caplog.set_level(logging.INFO, logger="sdengine")
    model = load_model("tiny", device="cpu", channels_last=True, fuse_qkv=True)
    compile_model(model, backend="eager")
    assert model.compiled and model.fused_qkv and model.channels_last
    assert "warm-up generations to run: 3" in caplog.text and "warm-up 3 of 3 done" in caplog.text
    graphs = _unique_graphs()
    n, f = model.native_size, 8 * model.latent_factor
    first = GenerationRequest("a red fox, " * 60, negative="blurry", steps=2, seed=2, count=3, width=n + 3 * f)
    for request in [first, GenerationRequest("a red fox", steps=2, seed=3, guidance=1.0, height=n - f)]:
        images = generate(model, request).images
        assert _unique_graphs() == graphs, request
    assert _max_diff(images[0], generate(tiny, request).images[0]) <= 1  # the kernel settings' bound


def test_padded_rows() -> None:
    expected = {1: 2, 2: 2, 3: 4, 6: 8, 9: 12, 13: 16, 17: 24, 25: 32, 32: 32}
    assert {rows: padded_rows(GRAPH_ROWS, rows) for rows in expected} == expected
    assert padded_rows(GRAPH_ROWS, 40) == 40  # past the last size: the call's own
    assert padded_rows((), 3) == 3


def _batches_seen(model: Model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    handle = model.unet.register_forward_pre_hook(lambda _module, args: seen.append(len(args[0])))
    return seen, handle


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_padded_unet_calls_draw_what_unpadded_calls_draw(name: str, tiny: Model) -> None:
    """A model set up as CUDA graphs want it (a few call sizes, outputs cloned out of the graph's memory) draws the
    same pictures; the pad rows reach the UNet, and their outputs are dropped. On a CPU the graphs themselves do not
    run: this proves the padding around them."""
    plain = tiny if name == "tiny" else load_model(name, device="cpu")
    padded = replace(plain, unet_rows=GRAPH_ROWS, cuda_graphs=True)  # the same modules, padded calls
    requests = [
        GenerationRequest(PROMPT, negative="blurry", steps=3, seed=5, count=3),  # 6 rows -> 8
        GenerationRequest(PROMPT, steps=3, seed=6, guidance=1.0),  # 1 row -> 2
    ]
    seen, handle = _batches_seen(plain)
    try:
        results = [(generate(plain, r).images, generate(padded, r).images) for r in requests]
    finally:
        handle.remove()
    assert seen == [6] * 3 + [8] * 3 + [1] * 3 + [2] * 3
    for theirs, ours in results:
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert isinstance(a, Image.Image)
            assert _max_diff(a, b) <= 1


def test_a_model_with_loras_stays_eager_and_says_why(
    tiny_folder: Path, lora_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dynamo specializes on the adapters and weights that are on, so each request's LoRAs would compile anew."""
    graphs = _unique_graphs()
    model = load_model(str(tiny_folder), device="cpu", loras=str(lora_folder), compile=True)
    assert not model.compiled and _unique_graphs() == graphs
    assert f"compile is off for {str(tiny_folder)!r}: its LoRA adapters" in caplog.text


def test_a_compile_that_fails_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    with pytest.raises(ModelLoadError, match=r"^torch.compile failed on cpu \(InvalidCxxCompiler: .*\): set compile"):
        load_model("tiny", device="cpu", compile=True)
