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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that hold slow tests first. Each worker takes a whole file at a time, in this order (pyproject turns
    off xdist's own, by number of tests, which put these few-test files last), and a worker that took a slow file
    near the end would hold up the run while the other idles."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: the rest keep their order


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
