"""The executor under faults: a supervised worker that never dies silently, and memory learned in images."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine import Model, OutOfMemory, SDEngineError
from sdengine.executor import MAX_CRASHES, Executor
from sdengine.jobs import ExecutorConfig, ExecutorDown, Job
from tests.test_executor import FaultyUNet, request, with_unet

CUDA_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
MPS_OOM = RuntimeError(
    "MPS backend out of memory (MPS allocated: 3.10 GB, other allocations: 0 bytes, max allowed: 3.40 GB). "
    "Tried to allocate 256.00 MB on private pool."
)


class DeviceFault(torch.Tensor):
    """A tensor whose copy to the host raises, as CUDA reports an earlier kernel's fault at the next sync."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.cpu:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().__torch_function__(func, types, args, kwargs or {})


class DeviceFaultUNet(torch.nn.Module):
    """Wraps the real UNet; for inputs that `poisoned` selects, its output carries a `DeviceFault`, which
    surfaces outside the UNet call, in the latent preview."""

    def __init__(self, unet: torch.nn.Module, poisoned: Callable[[torch.Tensor], bool]) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.poisoned = poisoned

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.unet(sample, *args, **kwargs)
        return SimpleNamespace(sample=out.sample.as_subclass(DeviceFault)) if self.poisoned(sample) else out


class FaultyVAE(torch.nn.Module):
    """Wraps the real VAE: `encode` raises `encode_error` if given, `decode` raises `decode_error` for latents
    that `poisoned` selects."""

    def __init__(
        self,
        vae: torch.nn.Module,
        *,
        encode_error: Exception | None = None,
        decode_error: Exception | None = None,
        poisoned: Callable[[torch.Tensor], bool] = lambda _: True,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.encode_error = encode_error
        self.decode_error = decode_error
        self.poisoned = poisoned
        self.decodes: list[int] = []  # images of every decode call

    def encode(self, pixels: torch.Tensor) -> Any:
        if self.encode_error is not None:
            raise self.encode_error
        return self.vae.encode(pixels)

    def decode(self, latents: torch.Tensor) -> Any:
        self.decodes.append(latents.shape[0])
        if self.decode_error is not None and self.poisoned(latents):
            raise self.decode_error
        return self.vae.decode(latents)


def with_vae(model: Model, vae: torch.nn.Module) -> Model:
    return dataclasses.replace(model, vae=vae)


def png(side: int = 64) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


async def outcome(job: Job) -> BaseException | None:
    """The error that ended `job`, or None if it succeeded; fails the test if it hangs."""
    async with asyncio.timeout(60):
        try:
            await job.result()
        except Exception as exc:
            return exc
    return None


def test_jobs_imports_without_torch() -> None:
    # A bare package stands in for sdengine/__init__.py, which is not this module's concern.
    root = Path(__file__).resolve().parents[1] / "sdengine"
    code = (
        "import sys, types; pkg = types.ModuleType('sdengine'); pkg.__path__ = [sys.argv[1]]; "
        "sys.modules['sdengine'] = pkg; import sdengine.jobs; assert 'torch' not in sys.modules, 'torch loaded'"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)


async def test_an_error_in_the_preview_fails_its_job_and_the_worker_serves_the_next(
    tiny: Model, caplog: pytest.LogCaptureFixture
) -> None:
    poison_width = 48  # latent width 24 for the tiny model: only the poisoned request has it
    unet = DeviceFaultUNet(tiny.unet, lambda x: x.shape[-1] == poison_width // 2)
    executor = Executor(with_unet(tiny, unet), ExecutorConfig(max_batch=1, preview_every=1))
    with caplog.at_level(logging.ERROR, logger="sdengine.executor"):
        error = await outcome(executor.submit(request("bad", width=poison_width), owner="a"))
    assert isinstance(error, SDEngineError) and str(error) == (
        "The generator hit an unexpected error (RuntimeError) while running this request: try again."
    )
    crash = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert crash.exc_info is not None and "illegal memory access" in str(crash.exc_info[1])

    assert await outcome(executor.submit(request("good"), owner="b")) is None
    stats = executor.stats()
    assert (stats.down, stats.completed, stats.failed) == (False, 1, 1)
    await executor.shutdown()


async def test_a_worker_that_keeps_crashing_goes_down_and_says_so(tiny: Model) -> None:
    unet = DeviceFaultUNet(tiny.unet, lambda _: True)  # the device is broken: every step faults
    config = ExecutorConfig(max_batch=1, preview_every=1, max_pending_per_owner=10)
    executor = Executor(with_unet(tiny, unet), config)
    executor.pause()
    crashing = [executor.submit(request(f"crash {i}"), owner=f"u{i}") for i in range(MAX_CRASHES)]
    waiting = executor.submit(request("waiting"), owner="last")
    executor.pause(False)
    for job in crashing:
        assert "unexpected error" in str(await outcome(job))
    assert isinstance(await outcome(waiting), ExecutorDown)

    stats = executor.stats()
    assert stats.down and f"{MAX_CRASHES} crashes in a row" in stats.down_reason
    with pytest.raises(ExecutorDown, match="an admin must restart the bot"):
        executor.submit(request(), owner="new")
    await executor.shutdown()


async def test_a_closed_event_loop_does_not_stop_the_worker(tiny: Model) -> None:
    executor = Executor(tiny, ExecutorConfig(max_batch=1))
    executor.pause()

    async def submit_and_leave() -> Job:
        return executor.submit(request("orphan", steps=50), owner="gone")

    orphan = await asyncio.to_thread(asyncio.run, submit_and_leave())  # its event loop is closed now
    executor.pause(False)
    assert await outcome(executor.submit(request(), owner="b")) is None
    assert orphan.cancel_requested  # nobody can hear it: the worker dropped it rather than run 50 steps
    assert executor.stats().completed == 1
    await executor.shutdown()


async def test_a_batch_that_runs_out_of_memory_lowers_max_batch_in_images_once(tiny: Model) -> None:
    fits = 2  # images per UNet call; a guided image takes two rows
    unet = FaultyUNet(tiny.unet, lambda x: x.shape[0] > 2 * fits, CUDA_OOM)
    executor = Executor(with_unet(tiny, unet), ExecutorConfig(max_batch=8))
    executor.pause()
    jobs = [executor.submit(request(f"job {i}", steps=4), owner=f"u{i}") for i in range(4)]
    executor.pause(False)
    assert [await outcome(job) for job in jobs] == [None] * 4

    assert len([rows for rows in unet.calls if rows > 2 * fits]) == 1  # one OOM, then smaller calls
    assert executor.stats().max_batch <= fits
    await executor.shutdown()


async def test_max_batch_probes_back_up_after_quiet_steps(tiny: Model) -> None:
    short: list[int] = []

    def memory_short_once(x: torch.Tensor) -> bool:
        if x.shape[0] > 4 and not short:
            short.append(x.shape[0])
            return True
        return False

    unet = FaultyUNet(tiny.unet, memory_short_once, CUDA_OOM)
    executor = Executor(with_unet(tiny, unet), ExecutorConfig(max_batch=4, probe_after_steps=2))
    assert await outcome(executor.submit(request(count=4, steps=8), owner="a")) is None

    # UNet rows per call, step by step: 4 images run out; 2+2 for the OOM's step and two quiet ones; 3+1 for
    # two more; then 4 again. One job's images are split across calls too.
    assert unet.calls == [8, 4, 4, 4, 4, 4, 4, 6, 2, 6, 2, 8, 8, 8]
    assert executor.stats().max_batch == 4
    await executor.shutdown()


async def test_an_mps_out_of_memory_error_counts_as_out_of_memory(tiny: Model) -> None:
    huge_latent_width = 48  # a 96-pixel-wide request never fits
    unet = FaultyUNet(tiny.unet, lambda x: x.shape[0] > 2 or x.shape[-1] == huge_latent_width, MPS_OOM)
    executor = Executor(with_unet(tiny, unet), ExecutorConfig(max_batch=4))
    executor.pause()
    fits = [executor.submit(request(f"fits {i}"), owner=f"u{i}") for i in range(2)]
    huge = executor.submit(request("huge", width=2 * huge_latent_width), owner="big")
    executor.pause(False)
    assert [await outcome(job) for job in fits] == [None, None]
    error = await outcome(huge)
    assert isinstance(error, OutOfMemory) and "lower the size or count" in str(error)
    assert len([rows for rows in unet.calls if rows > 2]) == 1
    assert executor.stats().max_batch == 1
    await executor.shutdown()


@pytest.mark.parametrize("oom", [CUDA_OOM, MPS_OOM], ids=["cuda", "mps"])
async def test_out_of_memory_in_prepare_or_decode_is_reported_as_such(tiny: Model, oom: Exception) -> None:
    vae = FaultyVAE(tiny.vae, encode_error=oom, decode_error=oom)
    executor = Executor(with_vae(tiny, vae))
    in_prepare = executor.submit(request("from an image", image=png()), owner="a")  # encodes its init image
    in_decode = executor.submit(request("from text"), owner="b")
    for job in (in_prepare, in_decode):
        error = await outcome(job)
        assert isinstance(error, OutOfMemory) and "lower the size or count" in str(error)
    await executor.shutdown()


async def test_a_decode_that_runs_out_of_memory_goes_image_by_image(tiny: Model) -> None:
    vae = FaultyVAE(tiny.vae, decode_error=CUDA_OOM, poisoned=lambda latents: latents.shape[0] > 1)
    executor = Executor(with_vae(tiny, vae))
    job = executor.submit(request(count=2), owner="a")
    assert await outcome(job) is None
    assert (await job.result()).seeds == [5, 6]
    assert vae.decodes == [2, 1, 1]
    await executor.shutdown()
