"""`compile = true` on the CPU: torch.compile (inductor) of tiny's UNet and VAE decoder, warmed up at load.

Measured: the compiled tiny draws within 1/255 per channel of the eager one (inductor fuses and reorders float
sums). The test keeps to one shape, the warm-up's, so it compiles once.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo.utils

from sdengine import GenerationRequest, Model, generate, load_model
from sdengine.errors import ModelLoadError
from tests.test_parity import PROMPT, _max_diff

MAX_DIFF = 2  # per channel, in /255 units; measured 1


def test_compiled_tiny_is_warmed_up_at_load_and_draws_what_eager_draws(
    tiny: Model, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sdengine")
    compiled = load_model("tiny", device="cpu", compile=True)
    assert compiled.compiled and not tiny.compiled
    assert "compiling the UNet and the VAE decoder of 'tiny' on cpu; warm-up generation" in caplog.text
    assert "warm-up done in" in caplog.text

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the UNet's and the decoder's, at least: the compiler did run
    request = GenerationRequest(PROMPT, negative="blurry", steps=3, seed=11)  # the warm-up's shapes, another prompt
    ours = generate(compiled, request).images[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the request compiled nothing
    assert _max_diff(ours, generate(tiny, request).images[0]) <= MAX_DIFF


def test_a_compile_that_fails_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    with pytest.raises(ModelLoadError, match=r"^torch.compile failed on cpu \(InvalidCxxCompiler: .*\): set compile"):
        load_model("tiny", device="cpu", compile=True)
