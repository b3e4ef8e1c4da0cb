"""What a model switch costs with `max_loaded`: two SD-1.5-shaped models (random weights, saved as diffusers folders
and loaded from disk as a user's would be) in one `ModelPool`, side by side in one run.

On a GPU the model pushed out waits in CPU memory and comes back as a copy; on a CPU device it is unloaded and
loaded again from disk. The figures: the start (both loaded once, one kept), each switch (push one out, bring the
other in), and memory: peak extra during a switch, and what stays resident with max_loaded = 1 against 0.

    python bench/model_switch.py                  # on the CPU
    python bench/model_switch.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PeakMemory, random_model, rss_bytes
from sdengine import GenerationRequest, generate
from sdengine.info import ModelSpec
from sdengine.models import save_model
from sdengine.pool import ModelPool


def resident_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    return rss_bytes() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--switches", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15"
        model = random_model("sd15", "cpu")
        save_model(model, folder)
        del model
        specs = {name: ModelSpec(str(folder), device=args.device, dtype="fp32") for name in ("a", "b")}
        base = resident_mib(args.device)

        # Safetensors weights are memory-mapped: part of a load is paid by the first step that touches them, so
        # each load is followed by a one-step picture (and a second one shows the warm cost).
        one_step = GenerationRequest("a lighthouse", steps=1, seed=0, width=64, height=64)
        started = time.perf_counter()
        pool = ModelPool.load(specs, default="a", max_loaded=1)
        print(f"start: both models loaded, 'a' kept: {time.perf_counter() - started:.1f} s")
        generate(pool.acquire("a", busy=set()), one_step)
        kept_one = resident_mib(args.device) - base
        print(f"{'switch':<8}{'load s':>8}{'first step s':>14}{'warm step s':>13}{'peak extra MiB':>16}")
        target = "b"
        for _ in range(args.switches):
            with PeakMemory(pool.device) as peak:
                started = time.perf_counter()
                model = pool.acquire(target, busy=set())
                loaded = time.perf_counter()
                generate(model, one_step)
                first = time.perf_counter()
            generate(model, one_step)
            warm = time.perf_counter() - first
            del model
            print(
                f"{'-> ' + target:<8}{loaded - started:>8.1f}{first - loaded:>14.1f}{warm:>13.1f}"
                f"{peak.peak / 2**20:>16.0f}",
                flush=True,
            )
            target = "a" if target == "b" else "b"
        del pool

        both = ModelPool.load(specs, default="a", max_loaded=0)
        for name in specs:
            generate(both.acquire(name, busy=set()), one_step)
        kept_both = resident_mib(args.device) - base
        del both
        print(f"resident: {kept_one:.0f} MiB with max_loaded = 1, {kept_both:.0f} MiB with 0 (both loaded)")


if __name__ == "__main__":
    main()
