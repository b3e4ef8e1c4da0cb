"""`compile = true`: torch.compile the UNet and the VAE decoder when the model loads, and on CUDA replay the UNet
as CUDA graphs.

torch.compile compiles lazily, on the first call with a new shape, which takes from seconds (a GPU) to minutes (a
CPU). So the load runs warm-up generations (`warm_ups`) until the batch, the size and the prompt length are dynamic
dimensions of every graph; after that no request compiles (tests/test_compile.py proves it for a spread of
requests).

CUDA graphs (`cuda_graphs`, on by default, CUDA only): the UNet compiles as mode "reduce-overhead" does, which records
each call shape as one CUDA graph and replays it, so that a step launches one graph rather than about a thousand
kernels; at batch 1 on a fast GPU, launching is most of a step's time. Every call shape keeps a graph and its
memory, so UNet calls are padded up to one of a few batch sizes (`GRAPH_ROWS`, in `predict_noise`). The VAE
decoder runs once per picture and keeps plain compiled kernels.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .errors import ModelLoadError
from .models import Model
from .pipeline import generate, predict_noise, prepare
from .request import GenerationRequest

log = logging.getLogger(__name__)

WARM_UP_STEPS = 2  # the timestep is a tensor input, so more steps would compile nothing more
# UNet rows (two per image with guidance) of the graphs: 1, 2, 4, 6, 8, 12 and 16 guided images. A call is padded up
# to the next one, which wastes at most a third of a call; past the last, calls run at their own size.
GRAPH_ROWS = (2, 4, 8, 12, 16, 24, 32)
# Without graphs only one row is padded (to 2): dynamo compiles a size of 1 again, as a special case.
COMPILED_ROWS = (2,)


def freezing(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On a CPU, inductor's freezing for the compiles inside (the UNet's): the weights become constants of the graph,
    prepacked for oneDNN's convolutions and matmuls. Without it, compiling made the SD-1.5-shaped UNet slower than
    eager on a CPU (bench/compile.py). Dynamo reads the setting while it traces, on the first call, so it is set
    around that call rather than passed to compile; and it holds in this thread only (torch keeps such settings per
    context)."""
    patch: contextlib.AbstractContextManager[Any] = torch._inductor.config.patch(freezing=device.type == "cpu")
    return patch


def warm_ups(model: Model) -> list[GenerationRequest]:
    """Three generations: one picture at the native size; two pictures a little bigger, with a prompt longer than one
    77-token window (dynamo then makes the batch, the size and the prompt length dynamic); one picture at that bigger
    size, because dynamo keeps a batch of one apart (it specializes sizes of 1), so that its size becomes dynamic."""
    size = model.native_size
    bigger = size + 8 * model.latent_factor
    return [
        GenerationRequest("warm-up", steps=WARM_UP_STEPS, seed=0, width=size, height=size),
        GenerationRequest("warm-up " * 80, steps=WARM_UP_STEPS, seed=0, count=2, width=bigger, height=bigger),
        GenerationRequest("warm-up", steps=WARM_UP_STEPS, seed=0, width=bigger, height=bigger),
    ]


def compile_model(
    model: Model,
    backend: str = "inductor",
    cuda_graphs: bool = True,
    warm_up: Sequence[GenerationRequest] | None = None,
) -> None:
    """Compile the UNet and the VAE decoder in place, then run `warm_up` (default: `warm_ups(model)`) so that the
    compiler runs now, not on a user's request.

    `backend="eager"` traces with dynamo but generates no code: a quick run of the same path, for smoke tests."""
    graphs = cuda_graphs and model.device.type == "cuda"
    requests = warm_ups(model) if warm_up is None else warm_up
    log.info(
        "compiling the UNet and the VAE decoder of %r on %s%s; warm-up generations to run: %d",
        model.name,
        model.device,
        " with CUDA graphs" if graphs else "",
        len(requests),
    )
    started = time.perf_counter()
    try:
        # In place (nn.Module.compile), so model.unet keeps its class, config and dtype for all who read them.
        model.unet.compile(backend=backend, mode="reduce-overhead" if graphs else None)
        model.vae.decoder.compile(backend=backend)  # vae.decode = post_quant_conv + decoder: nearly all is the decoder
        model.unet_rows, model.cuda_graphs = (GRAPH_ROWS if graphs else COMPILED_ROWS), graphs
        # torch keeps CUDA graphs per thread: those the warm-up records go when its thread ends, and the thread
        # that generates later records its own.
        with ThreadPoolExecutor(1, thread_name_prefix="sdengine-warm-up") as thread:
            for i, request in enumerate(requests, 1):
                thread.submit(_warm_up, model, request).result()
                log.info("warm-up %d of %d done at %.1f s", i, len(requests), time.perf_counter() - started)
    except Exception as exc:  # a missing C++ compiler, an unsupported op: the eager model would still work
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"torch.compile failed on {model.device} ({first}): set compile to false.") from exc
    model.compiled = True
    log.info("compiled %r: warm-up done in %.1f s", model.name, time.perf_counter() - started)


def _warm_up(model: Model, request: GenerationRequest) -> None:
    """The request's UNet calls first, frozen on a CPU; then the whole generation, whose UNet calls find their graphs
    ready. The decoder is not frozen: it runs once a picture, and inductor caches only graphs that are not frozen."""
    with freezing(model.device):
        predict_noise(model, prepare(model, request).samples)
    generate(model, request)
