"""`[executor]` and `[executor.ray]`: defaults, and every bad value refused with one line naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.config import ConfigError, ExecutorSettings, RaySettings, load_settings, parse_settings


def test_defaults_keep_the_local_backend() -> None:
    assert parse_settings({}).executor == ExecutorSettings("local", RaySettings("auto", 0, 1.0))


@pytest.mark.parametrize("address", ["auto", "local", "ray://head.example:10001", "10.0.0.5:6379"])
def test_ray_settings_are_read(address: str) -> None:
    data = {"executor": {"backend": "ray", "ray": {"address": address, "workers": 2, "gpus_per_worker": 0.5}}}
    assert parse_settings(data).executor == ExecutorSettings("ray", RaySettings(address, 2, 0.5))


@pytest.mark.parametrize(
    ("executor", "key"),
    [
        ({"backend": "spark"}, "executor.backend"),
        ({"backend": 1}, "executor.backend"),
        ({"bakend": "ray"}, "executor.bakend"),
        ({"ray": 3}, "executor.ray"),
        ({"ray": {"address": "http://head:10001"}}, "executor.ray.address"),
        ({"ray": {"address": "head:99999"}}, "executor.ray.address"),
        ({"ray": {"address": ""}}, "executor.ray.address"),
        ({"ray": {"address": 6379}}, "executor.ray.address"),
        ({"ray": {"workers": -1}}, "executor.ray.workers"),
        ({"ray": {"workers": 1.5}}, "executor.ray.workers"),
        ({"ray": {"workers": True}}, "executor.ray.workers"),
        ({"ray": {"gpus_per_worker": -1}}, "executor.ray.gpus_per_worker"),
        ({"ray": {"gpus_per_worker": "one"}}, "executor.ray.gpus_per_worker"),
        ({"ray": {"gpus_per_worker": 0}}, "executor.ray.workers"),  # 0 workers = one per GPU: none on CPUs
        ({"ray": {"wokers": 2}}, "executor.ray.wokers"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(executor: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"executor": executor})
    message = str(caught.value)
    assert message.startswith(f"{key}: ") and "\n" not in message, message


def test_the_example_config_documents_the_executor() -> None:
    assert load_settings(Path(__file__).parent.parent / "config.example.toml").executor == ExecutorSettings()
