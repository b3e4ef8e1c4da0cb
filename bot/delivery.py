"""Follow a queued job to its end on its output: the progress edits, then the result with its buttons, a failure
or a cancellation, each recorded in the job's row once the user has seen it.

`save` is how every status write of a run is made: one that fails must not end the run.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence

from PIL import Image

import sdengine
from bot import render
from bot.buttons import progress_view, result_view
from bot.config import Settings
from bot.output import Output
from bot.policy import black_out_flagged
from bot.progress import Painter
from bot.render import File
from bot.store import Store
from sdengine.jobs import Done, Failed, Job, JobCancelled, Loading, Queued, Started, Step

log = logging.getLogger(__name__)

# A status write that fails (the database locked past its busy_timeout, or the disk full) is tried this often, this
# many seconds apart. The run goes on meanwhile: a row left unfinished is run again after the next restart.
DB_TRIES = 3
DB_RETRY_DELAY = 1.0


class Delivery:
    """Shows each job of the generation service on its output, from its place in the queue to its end."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: Mapping[str, sdengine.ModelInfo],
        *,
        progress_interval: float = 2.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models  # names and sizes: the Ray backend has no model in this process
        self.progress_interval = progress_interval

    async def follow(self, gen_id: int, job: Job, output: Output, notes: Sequence[str], *, previews: bool) -> None:
        """Show `job`'s progress on `output` until it ends, then its end; `previews`: the latent previews too."""
        painter = Painter(output, progress_view(gen_id), self.progress_interval)
        preview: list[File] = []
        end: Done | Failed | JobCancelled | None = None
        try:
            async for event in job.events():
                if isinstance(event, Queued):
                    painter.paint(render.queued_text(gen_id, event.position, event.length), preview)
                elif isinstance(event, Loading):
                    painter.paint(render.loading_text(gen_id, event.model), preview)
                elif isinstance(event, Started):
                    # Only shown by /history: one try, so that a locked database does not hold up the progress.
                    await save(gen_id, lambda: self.store.mark_running(gen_id), tries=1)
                    painter.paint(render.started_text(gen_id, event.batch_size), preview)
                elif isinstance(event, Step):
                    if previews and isinstance(event.preview, Image.Image):
                        preview = [(f"preview-{gen_id}.png", render.preview_png(event.preview))]
                    painter.paint(render.step_text(gen_id, event.step, event.total), preview)
                else:
                    end = event
        finally:
            await painter.close()

        if isinstance(end, Done):
            await self._deliver(gen_id, job.request, end.result, output, notes)
        elif isinstance(end, Failed):
            reason = str(end.error)
            log.info("#%d failed: %s", gen_id, reason)
            # The user first, the row after, as for a request GenerationService._queue_and_follow rejects.
            await output.show(f"**#{gen_id}** · {reason}", final=True)
            await save(gen_id, lambda: self.store.mark_failed(gen_id, reason))
        elif isinstance(end, JobCancelled):
            await self.cancelled(gen_id, output)

    async def cancelled(self, gen_id: int, output: Output) -> None:
        log.info("#%d cancelled", gen_id)
        await save(gen_id, lambda: self.store.mark_cancelled(gen_id))
        await output.show(f"**#{gen_id}** · cancelled.", final=True)

    async def _deliver(
        self,
        gen_id: int,
        request: sdengine.GenerationRequest,
        result: sdengine.GenerationResult,
        output: Output,
        notes: Sequence[str],
    ) -> None:
        pictures, pngs, safety_notes = await asyncio.to_thread(black_out_flagged, result)
        if safety_notes:
            log.info("#%d: the safety checker flagged images %s", gen_id, [i for i, f in enumerate(result.nsfw) if f])
        images = [(render.image_name(gen_id, i), data) for i, data in enumerate(pngs)]
        grid: list[File] = []
        if len(images) > 1:
            grid = [(render.grid_name(gen_id), await asyncio.to_thread(_grid_png, pictures))]
        # The single images carry their parameters and feed the Vary buttons, so they go first when room is short.
        kept, dropped = render.fit_files([*images, *grid], output.filesize_limit)
        kept.sort(key=lambda file: file not in grid)
        notes = [*notes, *result.notices, *safety_notes]
        width, height = result.width, result.height
        if request.hires_scale is not None:  # the row keeps the first pass's size, which a reroll asks for again
            native = self.models[request.model or self.settings.model.label].native_size
            width, height = request.width or native, request.height or native
            upscaler = sdengine.HIRES_UPSCALERS[request.hires_upscaler]
            notes.append(f"Hires fix {request.hires_scale:g}x from {width}x{height} ({upscaler}).")
        if dropped:
            notes.append(
                f"{len(dropped)} of the files did not fit Discord's upload limit and were left out: "
                f"/reroll {gen_id} draws them again."
            )
        content = render.result_text(
            gen_id,
            request.prompt,
            seeds=result.seeds,
            width=result.width,
            height=result.height,
            steps=request.steps,
            scheduler=result.scheduler,
            notes=notes,
        )
        view = result_view(gen_id, len(result.pngs), upscaled=request.hires_scale is not None)
        message = await output.show(content, kept, view, final=True)
        if message is None:  # nowhere to show it: the row must not claim it was delivered
            reason = f"The picture was made but could not be posted: /reroll {gen_id} draws it again."
            await save(gen_id, lambda: self.store.mark_failed(gen_id, reason))
            return
        await save(
            gen_id,
            lambda: self.store.mark_done(
                gen_id,
                seeds=result.seeds,
                width=width,
                height=height,
                timings=result.timings,
                notices=[*result.notices, *safety_notes],
                message_id=message.id,
            ),
        )
        log.info("#%d done: seeds %s in %s", gen_id, result.seeds, result.timings)


async def save(gen_id: int, write: Callable[[], Awaitable[object]], *, tries: int = DB_TRIES) -> None:
    """A status write that must not end the run: a database error is retried, then logged. A row it leaves
    unfinished runs again after the next restart (at worst, a result posted twice; never one lost)."""
    for attempt in range(1, tries + 1):
        try:
            await write()
            return
        except sqlite3.Error as exc:
            log.warning("#%d: could not update its row (try %d of %d): %s", gen_id, attempt, tries, exc)
        if attempt < tries:
            await asyncio.sleep(DB_RETRY_DELAY)  # a pause between tries, not a wait for something


def _grid_png(images: Sequence[Image.Image]) -> bytes:
    return render.png(render.grid(images))
