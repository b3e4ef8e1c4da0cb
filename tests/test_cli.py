"""The `sdengine` CLI, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def sdengine(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdengine", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_imagine_writes_a_png_that_info_reads_back(tmp_path: Path) -> None:
    done = sdengine(
        "imagine", "a spaceship", "--model", "tiny", "--seed", "1", "--steps", "3", "--out", "x.png", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "x.png\tseed 1"
    assert "step 3/3" in done.stderr
    info = sdengine("info", "x.png", cwd=tmp_path)
    assert info.returncode == 0
    assert info.stdout.splitlines()[0] == "a spaceship"
    assert "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: tiny" in info.stdout

    variation = sdengine(
        "imagine",
        "a boat",
        "--model",
        "tiny",
        "--image",
        "x.png",
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--count",
        "2",
        "--seed",
        "7",
        "--out",
        "v.png",
        cwd=tmp_path,
    )
    assert variation.returncode == 0, variation.stderr
    assert variation.stdout.split() == ["v-0.png", "seed", "7", "v-1.png", "seed", "8"]
    assert "Denoising strength: 0.5" in sdengine("info", "v-1.png", cwd=tmp_path).stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["imagine", "", "--model", "tiny"], "The prompt is empty"),
        (["imagine", "x", "--model", "tiny", "--steps", "0"], "Steps must be between 1 and 150"),
        (["imagine", "x", "--model", "tiny", "--width", "63"], "multiple of 2"),
        (["imagine", "x", "--steps", "many"], "invalid int value"),
        (["imagine", "x", "--scheduler", "pndm"], "invalid choice"),
        (["imagine", "x", "--model", "/no/such/folder"], "No model at"),
        (["imagine", "x", "--model", "tiny", "--image", "missing.png"], "No such file"),
        (["info", "missing.png"], "has no generation parameters"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    done = sdengine(*args, cwd=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0] and lines[0].startswith("sdengine: ")
