"""The first max_batch: from free memory and the models' per-image cost on CUDA, fixed elsewhere."""

from __future__ import annotations

import logging

import pytest
import torch

from sdengine.batching import BATCH_CEILING, batch_for_memory, cuda_max_batch, default_max_batch, per_image_bytes
from sdengine.info import ModelInfo, ModelSpec
from sdengine.models import LOW_MEMORY_BELOW
from sdengine.pool import ModelPool

GIB = 2**30


def info(kind: str, dtype: str = "float16") -> ModelInfo:
    return ModelInfo(name=kind, native_size=512, latent_factor=8, has_safety_checker=False, dtype=dtype, kind=kind)


def test_the_batch_is_what_fits_between_one_and_the_ceiling() -> None:
    per_image = GIB // 2
    assert batch_for_memory(3 * per_image, per_image) == 3
    assert batch_for_memory(3 * per_image - 1, per_image) == 2  # the third image does not quite fit
    assert batch_for_memory(0, per_image) == 1  # one always runs; an out-of-memory error then says so
    assert batch_for_memory(100 * GIB, per_image) == BATCH_CEILING
    assert batch_for_memory(100 * GIB, per_image, ceiling=4) == 4
    with pytest.raises(ValueError, match="per_image must be positive, not 0"):
        batch_for_memory(GIB, 0)


def test_the_per_image_cost_follows_the_kind_and_the_precision() -> None:
    """LOW_MEMORY_BELOW is about a batch of 4 in fp16; fp32 takes twice the memory, bf16 the same."""
    assert per_image_bytes("sd1") * 4 == LOW_MEMORY_BELOW["sd1"]
    assert per_image_bytes("sd1") < per_image_bytes("sd2") < per_image_bytes("sdxl")
    assert per_image_bytes("sdxl", "float32") == 2 * per_image_bytes("sdxl", "bfloat16") == 4 * GIB


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    """tiny (SD 1.x) and tiny-xl (SDXL), both fp32 on the CPU."""
    return ModelPool.load({"a": ModelSpec("tiny", device="cpu"), "b": ModelSpec("tiny-xl", device="cpu")}, "a")


def test_cpu_and_mps_keep_their_fixed_batch(pool: ModelPool) -> None:
    assert default_max_batch(torch.device("cpu"), pool.infos.values()) == 1
    assert default_max_batch(torch.device("mps"), pool.infos.values()) == 4
    assert default_max_batch(torch.device("cuda")) == 8  # no models to go by


def test_cuda_goes_by_the_costliest_model_of_the_pool(pool: ModelPool, monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: the one CUDA call answers what a card with 20 GiB free would.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * GIB, 80 * GIB))
    assert default_max_batch(torch.device("cuda"), pool.infos.values()) == 5  # tiny-xl in fp32: 4 GiB an image


@pytest.mark.parametrize(
    ("free_gib", "models", "batch"),
    [
        (20, [info("sd1")], 16),  # a 24 GB card with SD 1.5 in fp16: 26 images fit, the ceiling holds
        (6, [info("sd1")], 8),  # 0.75 GiB each
        (20, [info("sd1"), info("sdxl")], 10),  # the costlier model decides: 2 GiB each
        (20, [info("sdxl", "float32")], 5),
        (1, [info("sdxl")], 1),
    ],
)
def test_cuda_batches_what_its_free_memory_holds(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    free_gib: int,
    models: list[ModelInfo],
    batch: int,
) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gib * GIB, 80 * GIB))
    caplog.set_level(logging.INFO, logger="sdengine")
    assert cuda_max_batch(torch.device("cuda"), models) == batch
    assert f"max_batch {batch} on cuda: {free_gib:.1f} GiB free, about" in caplog.text
