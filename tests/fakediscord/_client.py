"""Run a real discord.py client against a started ``FakeDiscord`` for the duration of a block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import discord

from ._fake import FakeDiscord

ClientT = TypeVar("ClientT", bound=discord.Client)


async def _until(task: asyncio.Task[None], waiter: Awaitable[object], timeout: float, what: str) -> None:
    """Await ``waiter`` but fail fast (with the client's own exception) if the client task dies."""
    fut = asyncio.ensure_future(waiter)
    done, _ = await asyncio.wait({task, fut}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if fut in done:
        fut.result()
        return
    fut.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await fut
    if task in done:
        task.result()  # re-raises LoginFailure, ConnectionClosed, ...
        raise RuntimeError(f"client stopped before {what}")
    raise TimeoutError(f"client not {what} within {timeout}s")


@contextlib.asynccontextmanager
async def run_client(
    fake: FakeDiscord, client: ClientT, *, wait_until_ready: bool = True, timeout: float = 60.0
) -> AsyncIterator[ClientT]:
    """``client.start(fake.token)`` in a task; wait for READY (and ``on_ready`` unless told not to).

    On exit the client is closed and its task awaited, so no sockets or tasks leak.
    """
    task: asyncio.Task[None] = asyncio.create_task(client.start(fake.token), name="fakediscord-client")
    error: BaseException | None = None
    try:
        await _until(task, fake.wait_ready(timeout), timeout, "identified")
        if wait_until_ready:
            await _until(task, client.wait_until_ready(), timeout, "ready")
        yield client
    finally:
        await client.close()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif not task.cancelled():
            error = task.exception()  # retrieve it even when the block itself failed
    if error is not None:
        raise error
