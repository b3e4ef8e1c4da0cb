"""Shared fixtures: random-weight models built locally, since no model hub is reachable in tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sdengine import Model, load_model, save_model
from sdengine.models import pick_device
from sdengine.tiny import build_components

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test process under pytest-xdist: two workers on two cores, neither fighting the other.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny() -> Model:
    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny: Model) -> Path:
    """`tiny` saved as a diffusers folder, readable by both sdengine and diffusers."""
    return save_model(tiny, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def factor4_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose VAE downscales by 4, to catch any hard-coded factor of 8."""
    device, dtype = pick_device("cpu")
    model = Model(name="factor4", device=device, dtype=dtype, **build_components("tiny", seed=1, vae_blocks=3))
    assert model.latent_factor == 4
    return save_model(model, tmp_path_factory.mktemp("factor4") / "model")
