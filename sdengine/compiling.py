"""`compile = true`: torch.compile the UNet and the VAE decoder when the model loads.

torch.compile compiles lazily, on the first call with a new shape, which takes from seconds (a GPU) to minutes (a
CPU). So the load runs one warm-up generation at the model's native size, with guidance, and a user's first request
of that shape finds the compiled code ready. Another size or batch compiles once, the first time it is seen (then
torch marks that dimension dynamic, so later sizes reuse it).
"""

from __future__ import annotations

import logging
import time

from .errors import ModelLoadError
from .models import Model
from .pipeline import generate
from .request import GenerationRequest

log = logging.getLogger(__name__)

WARM_UP_STEPS = 2  # the timestep is a tensor input, so more steps would compile nothing more


def compile_model(model: Model, backend: str = "inductor") -> None:
    """Compile the UNet and the VAE decoder in place, then generate once so that the compiler runs now.

    `backend="eager"` traces with dynamo but generates no code: a quick run of the same path, for smoke tests."""
    size = model.native_size
    log.info(
        "compiling the UNet and the VAE decoder of %r on %s; warm-up generation (%dx%d, %d steps) follows",
        model.name,
        model.device,
        size,
        size,
        WARM_UP_STEPS,
    )
    started = time.perf_counter()
    try:
        # In place (nn.Module.compile), so model.unet keeps its class, config and dtype for all who read them.
        model.unet.compile(backend=backend)
        model.vae.decoder.compile(backend=backend)  # vae.decode = post_quant_conv + decoder: nearly all is the decoder
        generate(model, GenerationRequest("warm-up", steps=WARM_UP_STEPS, seed=0, width=size, height=size))
    except Exception as exc:  # a missing C++ compiler, an unsupported op: the eager model would still work
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"torch.compile failed on {model.device} ({first}): set compile to false.") from exc
    model.compiled = True
    log.info("compiled %r: warm-up done in %.1f s", model.name, time.perf_counter() - started)
