"""The progress painter: shows a generation's latest progress at most once per interval, off the event reader."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import discord

from bot.output import Output
from bot.render import File

log = logging.getLogger(__name__)


class Painter:
    """Paints the latest progress on `output`; `close()` stops it. A failed edit only ends the progress edits
    (`Output.show` swallows transport errors), and whatever else goes wrong in here is logged, never raised: a
    broken progress message must not cost the user their picture."""

    def __init__(self, output: Output, view: discord.ui.View, interval: float) -> None:
        self._output = output
        self._view = view
        self._interval = interval
        self._latest: tuple[str, list[File]] = ("", [])
        self._wake = asyncio.Event()
        self._busy = False
        self._closed = False
        self._task = asyncio.create_task(self._run(), name="sdbot-progress")

    def paint(self, content: str, files: list[File]) -> None:
        self._latest = (content, files)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._busy = True
            await self._output.show(*self._latest, self._view)
            self._busy = False
            if self._closed:
                return
            await asyncio.sleep(self._interval)  # the throttle

    async def close(self) -> None:
        """Stop painting. An edit in flight finishes first, so it cannot land after the result."""
        self._closed = True
        if not self._busy:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await self._task
            except Exception:
                log.exception("the progress painter failed; the result is posted anyway")
