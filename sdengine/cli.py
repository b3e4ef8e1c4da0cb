"""`sdengine imagine PROMPT ...` and `sdengine info IMAGE.png`.

Only argparse and the torch-free `request` module load before a command runs, so `--help` and argument
errors answer at once, and every input a model does not decide is checked before the (slow) model load.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

from .errors import SDEngineError
from .request import (
    DEFAULT_MODEL,
    HIRES_UPSCALERS,
    MAX_COUNT,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    SCHEDULERS,
    GenerationRequest,
    Progress,
    check_request,
    random_seed,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
_DEFAULTS = GenerationRequest(prompt="")
_AUTO_ON_OFF: dict[str, bool | None] = {"auto": None, "on": True, "off": False}  # load_model's kernel settings
_EXIT_CODES = (
    "exit codes: 0 done; 1 the request, a file or the model was refused (the one line on stderr says what to "
    "change); 2 bad command line; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT; a BaseException so that nothing
    on the way (model loading, the UNet loop) mistakes it for an ordinary error."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _usage_error(prog: str, message: str) -> NoReturn:
    """One line on stderr instead of usage text, as for every other bad input."""
    print(f"sdengine: {message} (see `{prog} --help`)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _usage_error(self.prog, message)


def _version() -> str:
    try:
        return metadata.version("sdbot")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdengine", description="Stable Diffusion with a hand-written denoising loop.", epilog=_EXIT_CODES
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    imagine = commands.add_parser(
        "imagine", help="generate images from a prompt (and an init image)", epilog=_EXIT_CODES
    )
    imagine.add_argument("prompt", metavar="PROMPT", help="what to draw; A1111 weights like (red:1.2) work")
    imagine.add_argument("--negative", metavar="TEXT", default="", help="what to avoid (default: nothing)")
    imagine.add_argument(
        "--model",
        metavar="M",
        default=DEFAULT_MODEL,
        help="hub id, diffusers folder, .safetensors file (SD 1.x, 2.x or SDXL), or `tiny` / `tiny-xl` (random "
        "weights, offline) (default: %(default)s)",
    )
    imagine.add_argument(
        "--device", metavar="D", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)"
    )
    imagine.add_argument("--dtype", metavar="T", default="auto", help="auto, fp32, fp16 or bf16 (default: %(default)s)")
    imagine.add_argument(
        "--loras",
        metavar="FOLDER",
        default="",
        help="a folder of LoRA .safetensors files, used with <lora:NAME:WEIGHT> in the prompt (default: none)",
    )
    imagine.add_argument(
        "--memory",
        choices=("auto", "fast", "low"),
        default="auto",
        help="low: sliced attention, a tiled VAE and text encoders off the GPU between uses, for small GPUs; "
        "auto picks from free GPU memory (default: %(default)s)",
    )
    imagine.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet and the VAE decoder: a slow start (a warm-up run), then faster steps",
    )
    for flag, what in (("--channels-last", "channels-last (NHWC) weights"), ("--fuse-qkv", "fused q/k/v attention")):
        imagine.add_argument(
            flag, choices=tuple(_AUTO_ON_OFF), default="auto", help=f"{what}; auto: on for CUDA (default: %(default)s)"
        )
    imagine.add_argument(
        "--scheduler", default=_DEFAULTS.scheduler, choices=SCHEDULERS, help="sampler (default: %(default)s)"
    )
    imagine.add_argument(
        "--steps",
        metavar="N",
        type=int,
        default=_DEFAULTS.steps,
        help=f"denoising steps, 1-{MAX_STEPS} (default: %(default)s)",
    )
    imagine.add_argument(
        "--guidance",
        metavar="G",
        type=float,
        default=_DEFAULTS.guidance,
        help=f"classifier-free guidance scale, 0-{MAX_GUIDANCE:g} (default: %(default)s)",
    )
    imagine.add_argument(
        "--seed",
        metavar="S",
        type=int,
        default=None,
        help=f"seed of the first image, 0-{MAX_SEED}; image i uses seed+i, so seed+count-1 must stay in that "
        "range (default: random)",
    )
    imagine.add_argument(
        "--width",
        metavar="W",
        type=int,
        default=None,
        help="pixels, a multiple of the model's scale factor (default: native)",
    )
    imagine.add_argument(
        "--height",
        metavar="H",
        type=int,
        default=None,
        help="pixels, a multiple of the model's scale factor (default: native)",
    )
    imagine.add_argument(
        "--count",
        metavar="N",
        type=int,
        default=_DEFAULTS.count,
        help=f"images, 1-{MAX_COUNT}; more than one also writes a grid (default: %(default)s)",
    )
    imagine.add_argument(
        "--image", metavar="PATH", type=Path, default=None, help="init image for image-to-image (default: none)"
    )
    imagine.add_argument(
        "--strength",
        metavar="F",
        type=float,
        default=None,
        help=f"how much to change the --image, in (0, 1] (default: {_DEFAULTS.strength})",
    )
    imagine.add_argument(
        "--hires",
        metavar="X",
        type=float,
        default=None,
        help="hires fix: draw at the size asked, then again X times bigger (1.5, 2, ...) from the upscaled picture "
        "(default: off)",
    )
    imagine.add_argument(
        "--hires-strength",
        metavar="F",
        type=float,
        default=_DEFAULTS.hires_strength,
        help="how much the hires pass may change the upscaled picture, in (0, 1] (default: %(default)s)",
    )
    imagine.add_argument(
        "--hires-steps", metavar="N", type=int, default=None, help="steps of the hires pass (default: --steps)"
    )
    imagine.add_argument(
        "--hires-upscaler",
        metavar="U",
        choices=HIRES_UPSCALERS,
        default=_DEFAULTS.hires_upscaler,
        help="latent (bilinear in latent space) or lanczos (in pixels) (default: %(default)s)",
    )
    imagine.add_argument(
        "--out",
        metavar="PATH",
        type=Path,
        default=Path("out.png"),
        help="output file; with --count > 1, -0, -1, ... and -grid are added to its name (default: %(default)s)",
    )

    info = commands.add_parser("info", help="print the generation parameters stored in a PNG", epilog=_EXIT_CODES)
    info.add_argument("image", metavar="IMAGE", type=Path, help="a PNG written by sdengine or A1111")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "imagine" and args.strength is not None and args.image is None:
        _usage_error("sdengine imagine", "--strength needs --image: give an init image or leave --strength out")
    logging.basicConfig(level=os.environ.get("SDENGINE_LOG", "WARNING"))
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal() works only there
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        if args.command == "info":
            return _info(args.image)
        return _imagine(args)
    except SDEngineError as exc:
        print(f"sdengine: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"sdengine: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sdengine: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("sdengine: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _info(path: Path) -> int:
    data = path.read_bytes()  # a missing file is an OSError, reported as such by main()
    from .images import read_parameters

    try:
        text = read_parameters(data)
    except (OSError, SyntaxError, ValueError):  # not a PNG
        text = None
    if text is None:
        print(
            f"sdengine: {path} has no generation parameters: give a PNG written by sdengine or A1111.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(text)
    return EXIT_OK


def _imagine(args: argparse.Namespace) -> int:
    # 1. Check everything the model does not decide, before the slow imports and the model load.
    image = args.image.read_bytes() if args.image is not None else None
    optional = {"strength": args.strength} if args.strength is not None else {}
    request = GenerationRequest(
        prompt=args.prompt,
        negative=args.negative,
        scheduler=args.scheduler,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        count=args.count,
        image=image,
        hires_scale=args.hires,
        hires_strength=args.hires_strength,
        hires_steps=args.hires_steps,
        hires_upscaler=args.hires_upscaler,
        **optional,
    )
    check_request(request)
    if request.seed is None:  # drawn here so that seed+count-1 stays a valid seed
        request = replace(request, seed=random_seed(request.count))

    # 2. Load the model, then check what depends on it (sizes against its latent scale factor).
    _quiet_libraries()
    from .grid import image_grid
    from .images import png_bytes, read_parameters
    from .models import load_model
    from .pipeline import check_inputs, generate

    model = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        memory=args.memory,
        compile=args.compile,
        loras=args.loras,
        channels_last=_AUTO_ON_OFF[args.channels_last],
        fuse_qkv=_AUTO_ON_OFF[args.fuse_qkv],
    )
    check_inputs(model, request)

    # 3. Generate, then write one PNG per image, and a grid for more than one.
    with _ProgressReport(sys.stderr) as report:
        result = generate(model, request, progress=report)
    for path, png, seed in zip(_output_paths(args.out, len(result.pngs)), result.pngs, result.seeds, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        print(f"{path}\tseed {seed}")
    if len(result.images) > 1:
        # Like A1111's grids, it carries the first image's parameters.
        path = _grid_path(args.out)
        path.write_bytes(png_bytes(image_grid(result.images), read_parameters(result.pngs[0]) or ""))
        print(f"{path}\tgrid")
    for notice in result.notices:
        print(f"note: {notice}", file=sys.stderr)
    return EXIT_OK


def _quiet_libraries() -> None:
    """Library chatter (deprecations, missing optional backends) is not for CLI users; errors still surface."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def _grid_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-grid{out.suffix or '.png'}")


class _ProgressReport:
    """Denoising progress on stderr: a tqdm bar on a terminal; elsewhere (logs, pipes) whole lines, about ten
    a run, because a bar's carriage returns fill logs with partial lines."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._terminal = stream.isatty()
        self._bar: Any = None  # tqdm ships no type hints

    def __call__(self, progress: Progress) -> None:
        if not self._terminal:
            every = max(1, progress.total // 10)
            if progress.step == 1 or progress.step % every == 0 or progress.step == progress.total:
                print(f"step {progress.step}/{progress.total}", file=self._stream, flush=True)
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=progress.total, file=self._stream, unit="step", dynamic_ncols=True)
        self._bar.update(progress.step - self._bar.n)

    def __enter__(self) -> _ProgressReport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Also on Ctrl-C or SIGTERM: closing ends the bar's line, so the message after it gets a line of its own.
        if self._bar is not None:
            self._bar.close()
