"""The `sdengine` CLI, run as a real subprocess, and the light top level of the `sdengine` package."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

import sdengine
from sdengine import cli, pipeline, request, schedulers
from sdengine.models import DEFAULT_MODEL

HEAVY = ("torch", "diffusers", "transformers")
TINY = ("--model", "tiny")


def sdengine_cli(*args: str, cwd: Path, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "sdengine", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def split_importtime(stderr: str) -> tuple[list[str], set[str]]:
    """(the other stderr lines, the top-level packages imported) from a `python -X importtime` run."""
    lines, packages = [], set()
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            packages.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
        else:
            lines.append(line)
    return lines, packages


def test_import_sdengine_and_its_light_names_without_torch() -> None:
    code = (
        "import sys, sdengine, sdengine.request, sdengine.errors\n"
        "from sdengine import GenerationRequest, InvalidRequest, SDEngineError, SCHEDULERS, MAX_SEED\n"
        "from sdengine import SCHEDULER_LABELS, DEFAULT_MODEL, check_request, random_seed\n"
        "print(sorted(set(sys.modules) & {'torch', 'diffusers', 'transformers'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves_and_the_torch_free_copies_agree() -> None:
    for name in sdengine.__all__:
        assert getattr(sdengine, name) is not None, name
    assert sdengine.generate is pipeline.generate and "generate" in dir(sdengine)
    # request.py holds torch-free copies of these for the CLI and the bot; they must not drift. (The limits have
    # one home, request.py, which the pipeline imports.)
    assert sdengine.DEFAULT_MODEL == DEFAULT_MODEL
    assert sdengine.SCHEDULER_LABELS == schedulers.SAMPLER_NAMES
    with pytest.raises(AttributeError):
        _ = sdengine.no_such_name  # type: ignore[attr-defined]


def test_seed_range_for_a_count() -> None:
    request.check_request(sdengine.GenerationRequest("x", seed=sdengine.MAX_SEED - 3, count=4))
    with pytest.raises(sdengine.InvalidRequest, match="With count 4 the seed can be at most 4294967292"):
        request.check_request(sdengine.GenerationRequest("x", seed=sdengine.MAX_SEED - 2, count=4))
    assert all(0 <= sdengine.random_seed(4) <= sdengine.MAX_SEED - 3 for _ in range(100))


@pytest.fixture
def in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`sdengine ARGS` run by `main` in this process, in tmp_path, as the console script calls it: quicker than a
    fresh process when torch loads anyway."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


def test_imagine_writes_a_png_that_info_reads_back(
    tmp_path: Path, in_process: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    done = sdengine_cli("imagine", "a spaceship", *TINY, "--seed", "1", "--steps", "3", "--out", "x.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "x.png\tseed 1"
    # stderr is a pipe here, not a terminal: whole progress lines, no carriage returns.
    assert "\r" not in done.stderr
    assert done.stderr.splitlines() == ["step 1/3", "step 2/3", "step 3/3"]
    info = in_process("info", "x.png")
    assert info.returncode == 0
    assert info.stdout.splitlines()[0] == "a spaceship"
    assert "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: tiny" in info.stdout

    variation = in_process(
        "imagine", "a boat", *TINY, "--image", "x.png", "--strength", "0.5", "--steps", "4", "--count", "2",
        "--seed", "7", "--out", "v.png", "--channels-last", "on", "--fuse-qkv", "on",
    )  # fmt: skip
    assert variation.returncode == 0, variation.stderr
    assert variation.stdout.split() == ["v-0.png", "seed", "7", "v-1.png", "seed", "8", "v-grid.png", "grid"]
    assert "Denoising strength: 0.5" in in_process("info", "v-1.png").stdout


def test_hires_writes_the_bigger_picture_with_a1111_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process: `main` as the console script calls it."""
    out = tmp_path / "h.png"
    args = ["imagine", "a ship", *TINY, "--steps", "2", "--seed", "3", "--hires", "1.5", "--hires-steps", "4"]
    assert cli.main([*args, "--hires-upscaler", "lanczos", "--out", str(out)]) == 0
    assert capsys.readouterr().err.splitlines() == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    with Image.open(out) as image:
        assert image.size == (96, 96)
    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    for field in ("Size: 64x64", "Denoising strength: 0.5", "Hires upscale: 1.5", "Hires steps: 4", "Lanczos"):
        assert field in info


def test_count_4_writes_a_grid_in_seed_order(
    tmp_path: Path, in_process: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    done = in_process("imagine", "a ship", *TINY, "--steps", "1", "--count", "4", "--out", "o.png")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["o-0.png", "o-1.png", "o-2.png", "o-3.png", "o-grid.png"]
    first = int(lines[0].split()[-1])
    assert [int(line.split()[-1]) for line in lines[:4]] == [first, first + 1, first + 2, first + 3]
    with Image.open(tmp_path / "o-grid.png") as grid:
        assert grid.size == (128, 128)
        for i in range(4):
            with Image.open(tmp_path / f"o-{i}.png") as image:
                box = ((i % 2) * 64, (i // 2) * 64, (i % 2) * 64 + 64, (i // 2) * 64 + 64)
                assert grid.crop(box).tobytes() == image.convert("RGB").tobytes()
    # It carries the first image's parameters, as A1111's grids do.
    assert f"Seed: {first}," in in_process("info", "o-grid.png").stdout


@pytest.mark.parametrize("args", [["--help"], ["imagine", "--help"]])
def test_help_shows_defaults_without_importing_torch(tmp_path: Path, args: list[str]) -> None:
    done = sdengine_cli(*args, cwd=tmp_path, importtime=True)
    assert done.returncode == 0, done.stderr
    _, packages = split_importtime(done.stderr)
    assert not packages & set(HEAVY)
    assert "exit codes: 0 done" in done.stdout.replace("\n", " ")
    if args[0] == "imagine":
        text = " ".join(done.stdout.split())  # undo argparse's line wrapping
        for shown in (DEFAULT_MODEL, "(default: 25)", "(default: out.png)", "(default: dpmpp_2m)", "0-4294967295"):
            assert shown in text.replace("- ", "-"), shown


def test_version(tmp_path: Path) -> None:
    done = sdengine_cli("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"sdengine {metadata.version('sdbot')}"


# (arguments, the start of the one stderr line after "sdengine: ", exit code, whether the model loads first)
BAD_INPUT = [
    ([], "the following arguments are required: command (see `sdengine --help`)", 2, False),
    (["imagine", "x", "--steps", "many"], "argument --steps: invalid int value", 2, False),
    (["imagine", "x", "--scheduler", "pndm"], "argument --scheduler: invalid choice", 2, False),
    (["imagine", "x", "--fuse-qkv", "yes"], "argument --fuse-qkv: invalid choice: 'yes'", 2, False),
    (["imagine", "x", "--strength", "5"], "--strength needs --image", 2, False),
    # The inputs are checked before the model loads: neither the offline hub id nor a missing folder is touched.
    (["imagine", ""], "The prompt is empty", 1, False),
    (["imagine", "", "--model", "/no/such/folder"], "The prompt is empty", 1, False),
    (["imagine", "x", "--steps", "0"], "Steps must be between 1 and 150", 1, False),
    (["imagine", "x", "--count", "5"], "Count must be between 1 and 4", 1, False),
    (["imagine", "x", "--guidance", "nan"], "Guidance must be between 0 and 30", 1, False),
    (["imagine", "x", "--width", "0"], "The width must be a positive number of pixels", 1, False),
    (["imagine", "x", "--seed", "-1"], "The seed must be between 0 and 4294967295", 1, False),
    (["imagine", "x", "--seed", "4294967295", "--count", "2"], "With count 2 the seed can be at most 4294967294", 1,
     False),
    (["imagine", "x", "--image", "junk.png", "--strength", "5"], "Strength must be above 0 and at most 1", 1, False),
    (["imagine", "x", "--image", "missing.png"], "No such file or directory: missing.png", 1, False),
    (["info", "missing.png"], "No such file or directory: missing.png", 1, False),
    (["info", "junk.png"], "junk.png has no generation parameters", 1, True),
    (["imagine", "x", *TINY, "--width", "63"], "The width must be a multiple of 2", 1, True),
    (["imagine", "x", "--model", "/no/such/folder"], "No model at", 1, True),
    (["imagine", "x", *TINY, "--loras", "/no/such/folder"], "The LoRA folder '/no/such/folder' is not", 1, True),
    (["imagine", "x <lora:y:5>"], "The weight of LoRA 'y' must be between -2 and 2, not 5.", 1, False),
    (["imagine", "x", "--hires", "9"], "The hires scale must be above 1 and at most 4, not 9.0.", 1, False),
    (["imagine", "x", "--hires-upscaler", "esrgan"], "argument --hires-upscaler: invalid choice", 2, False),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected", "code", "loads_model"), BAD_INPUT)
def test_bad_input_exits_non_zero_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
    code: int,
    loads_model: bool,
) -> None:
    (tmp_path / "junk.png").write_bytes(b"not an image")
    if loads_model:  # torch loads anyway: run `main` in this process, as the console script calls it
        monkeypatch.chdir(tmp_path)
        assert cli.main(args) == code
        lines = capsys.readouterr().err.splitlines()
    else:  # a fresh process, to see that nothing heavy is imported on the way to the answer
        done = sdengine_cli(*args, cwd=tmp_path, importtime=True)
        assert done.returncode == code
        lines, packages = split_importtime(done.stderr)
        assert not packages & set(HEAVY)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sdengine: {expected}"), lines[0]


def test_sigterm_exits_143_with_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "sdengine", "imagine", "x", *TINY, "--steps", "150", "--out", "t.png"]
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the first progress line: the UNet loop is running
        assert first == "step 1/150\n"
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=300) == 143
    assert rest.splitlines()[-1] == "sdengine: terminated"
    assert not (tmp_path / "t.png").exists()


def test_ctrl_c_on_a_terminal_ends_the_bar_then_says_interrupted(tmp_path: Path) -> None:
    """On a terminal the progress is a tqdm bar; "interrupted" still gets a line of its own."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    command = [sys.executable, "-m", "sdengine", "imagine", "x", *TINY, "--steps", "150", "--out", "t.png"]
    # A shell without job control (CI's) starts background work with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the CLI the default disposition a terminal would.
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(follower)
    output, interrupted = b"", False
    deadline = time.monotonic() + 300  # a ceiling, not a pace: each wait ends as soon as output comes
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not chunk:
                break
            output += chunk
            if not interrupted and b"1/150" in output:
                proc.send_signal(signal.SIGINT)
                interrupted = True
        assert proc.wait(timeout=300) == 130
    finally:
        proc.kill()
        os.close(leader)
    text = output.decode(errors="replace")
    assert "%|" in text and "1/150" in text  # tqdm's bar, not the plain lines
    before, message, after = text.partition("sdengine: interrupted")
    assert message and before.endswith("\n") and after.strip() == "", text
