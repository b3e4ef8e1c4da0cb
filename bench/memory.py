"""Peak memory of a VAE decode per `memory` mode, on the SD-1.5-shaped VAE with random weights.

The question from small GPUs: can a big picture be decoded in no more memory than an ordinary batch? Each case
runs in a fresh process, so one case's allocator cache cannot hide another's peak. Peak is the extra memory during
the decode: `torch.cuda.max_memory_allocated` on a GPU, RSS sampled every 5 ms on a CPU.

    python bench/memory.py                               # 512x512 x4 vs 1024x1024 x1, each mode, on the CPU
    python bench/memory.py --big 2048 --device cuda      # the 2048x2048 question, on a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one_case(mode: str, size: int, batch: int, device: str) -> dict[str, float]:
    """Decode `batch` latents of a `size`-pixel picture with the VAE set up as `mode` does it."""
    import torch

    from bench._common import PeakMemory, random_model
    from sdengine.models import set_memory_mode

    model = random_model("sd15", device)
    set_memory_mode(model, mode)
    factor = model.latent_factor
    latents = torch.randn(batch, 4, size // factor, size // factor, generator=torch.Generator("cpu").manual_seed(0))
    latents = latents.to(model.device, model.vae_dtype)
    with torch.inference_mode(), PeakMemory(model.device) as peak:
        started = time.perf_counter()
        model.vae.decode(latents / model.scaling_factor)
        seconds = time.perf_counter() - started
    return {"peak_mib": peak.peak / 2**20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=512, help="side of the batch's pictures (default: 512)")
    parser.add_argument("--batch", type=int, default=4, help="pictures in the batch (default: 4)")
    parser.add_argument("--big", type=int, default=1024, help="side of the one big picture (default: 1024)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        mode, size, batch = args.case.split(",")
        print(json.dumps(one_case(mode, int(size), int(batch), args.device)))
        return

    cases = [("fast", args.small, args.batch), ("low", args.small, args.batch), ("low", args.big, 1)]
    if args.big <= 1024:  # an untiled decode of a big picture can take tens of GiB: only where it is small
        cases.append(("fast", args.big, 1))
    print(f"SD-1.5-shaped VAE decode on {args.device}, random weights")
    print(f"{'mode':<6}{'picture':>16}{'peak MiB':>11}{'seconds':>10}")
    for mode, size, batch in cases:
        command = [sys.executable, __file__, "--case", f"{mode},{size},{batch}", "--device", args.device]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        picture = f"{batch} x {size}x{size}"
        print(f"{mode:<6}{picture:>16}{result['peak_mib']:>11.0f}{result['seconds']:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
