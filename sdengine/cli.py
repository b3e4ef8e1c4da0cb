"""`sdengine imagine PROMPT ...` and `sdengine info IMAGE.png`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .errors import SDEngineError
from .request import SCHEDULERS, GenerationRequest, Progress


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line on stderr instead of usage text, as for every other bad input."""
        self.exit(2, f"sdengine: {message} (see `sdengine {self.prog.split()[-1]} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdengine", description="Stable Diffusion with a hand-written denoising loop.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    imagine = commands.add_parser("imagine", help="generate images from a prompt (and an init image)")
    imagine.add_argument("prompt", help="what to draw; A1111 weights like (red:1.2) work")
    imagine.add_argument("--negative", default="", help="what to avoid")
    imagine.add_argument("--model", default=None, help="hub id, diffusers folder, .safetensors file, or `tiny`")
    imagine.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    imagine.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    imagine.add_argument("--scheduler", default="dpmpp_2m", choices=SCHEDULERS)
    imagine.add_argument("--steps", type=int, default=25, help="denoising steps, 1-150")
    imagine.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale, 0-30")
    imagine.add_argument("--seed", type=int, default=None, help="seed of the first image; random if left out")
    imagine.add_argument("--width", type=int, default=None, help="pixels; the model's native size if left out")
    imagine.add_argument("--height", type=int, default=None, help="pixels; the model's native size if left out")
    imagine.add_argument("--count", type=int, default=1, help="images, 1-4; image i uses seed+i")
    imagine.add_argument("--image", type=Path, default=None, help="init image for image-to-image")
    imagine.add_argument("--strength", type=float, default=0.75, help="how much to change the init image, (0, 1]")
    imagine.add_argument("--out", type=Path, default=Path("out.png"), help="output file; -N is added for count > 1")

    info = commands.add_parser("info", help="print the generation parameters stored in a PNG")
    info.add_argument("image", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("SDENGINE_LOG", "WARNING"))
    try:
        if args.command == "info":
            return _info(args.image)
        return _imagine(args)
    except SDEngineError as exc:
        print(f"sdengine: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sdengine: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdengine: interrupted", file=sys.stderr)
        return 130


def _info(path: Path) -> int:
    from .images import read_parameters

    try:
        text = read_parameters(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        text = None
    if text is None:
        print(
            f"sdengine: {path} has no generation parameters: give a PNG written by sdengine or A1111.",
            file=sys.stderr,
        )
        return 1
    print(text)
    return 0


def _imagine(args: argparse.Namespace) -> int:
    image = args.image.read_bytes() if args.image is not None else None
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
        strength=args.strength,
    )
    # Library chatter (deprecations, missing optional backends) is not for CLI users; errors still surface.
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    from .models import DEFAULT_MODEL, load_model
    from .pipeline import check_inputs, generate

    model = load_model(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype)
    check_inputs(model, request)
    result = generate(model, request, progress=_progress_bar)
    outputs = _output_paths(args.out, len(result.pngs))
    for path, png, seed in zip(outputs, result.pngs, result.seeds, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        print(f"{path}\tseed {seed}")
    for notice in result.notices:
        print(f"note: {notice}", file=sys.stderr)
    return 0


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def _progress_bar(progress: Progress) -> None:
    width = 30
    filled = width * progress.step // progress.total
    end = "\n" if progress.step == progress.total else ""
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] step {progress.step}/{progress.total}",
        end=end,
        file=sys.stderr,
    )
