"""Run one generation end to end, whatever started it: a slash command, a reply, a context menu or a button.

    log the row -> check it (limits, cost, cooldown, caps) -> fetch the init image -> executor.submit
    -> progress edits -> result + buttons -> mark the row

Every request gets its row before anything can go wrong, so a refused one is logged with its reason too; and it is
refused before anything is downloaded, so a refusal costs nothing but that row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import discord
from PIL import Image

import sdengine
from bot import render
from bot.access import Place
from bot.buttons import progress_view, result_view
from bot.config import Settings
from bot.download import Downloader, ImageSource, InitImage
from bot.output import Output
from bot.policy import Policy, black_out_flagged
from bot.progress import Painter
from bot.render import File
from bot.replies import BLOCKED, SORRY, UserError, database_trouble
from bot.requests import Requests, image_seed
from bot.store import Generation, Kind, NewGeneration, Store
from sdengine.jobs import Done, Failed, Job, JobCancelled, Loading, Queued, Started, Step

if TYPE_CHECKING:  # the executor modules load torch or Ray; the bot only holds one, made by the app
    from sdengine.executor import Executor
    from sdengine.ray_executor import RayExecutor

log = logging.getLogger(__name__)

# A status write that fails (the database locked past its busy_timeout, or the disk full) is tried this often, this
# many seconds apart. The run goes on meanwhile: a row left unfinished is run again after the next restart.
DB_TRIES = 3
DB_RETRY_DELAY = 1.0


@dataclass(frozen=True)
class Redraw:
    """An init image that is no longer attached anywhere: drawn again from its stored seed, as the first stage of
    the variation, under the variation's own id (so /cancel, purges and blocks reach it)."""

    request: sdengine.GenerationRequest


@dataclass(frozen=True)
class LiveJob:
    """A generation queued or running in the executor, and where it was asked for."""

    job: Job
    made: Place


def prompt_in_png(data: bytes) -> str:
    """The prompt a PNG carries in its A1111 `parameters` (its first line), or ""."""
    try:
        parameters = sdengine.read_parameters(data)
    except Exception:  # not a PNG, or a broken one: no prompt to reuse
        return ""
    return parameters.split("\n", 1)[0].strip() if parameters else ""


class GenerationService:
    """Runs generations for every entry point and keeps the jobs in flight, by generation id."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        executor: Executor | RayExecutor,
        models: Mapping[str, sdengine.ModelInfo],
        *,
        progress_interval: float = 2.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.executor = executor
        self.models = models  # names and sizes: the Ray backend has no model in this process
        self.policy = Policy(settings, models)
        self.requests = Requests(settings, models)
        self.downloader = Downloader(settings.limits.max_image_bytes)
        self.progress_interval = progress_interval
        self.live: dict[int, LiveJob] = {}  # generation id -> its job, while queued or running
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- entry points ------------------------------------------------------------------------------------

    async def run(
        self,
        request: sdengine.GenerationRequest,
        output: Output,
        *,
        kind: Kind,
        user: discord.abc.User,
        image: ImageSource | Redraw | None = None,
        parent_id: int | None = None,
        notes: Sequence[str] = (),
        problem: str | None = None,
    ) -> int | None:
        """Run `request` (with the init image from `image`, if given) and show it on `output`; returns the
        generation id, or None when the database refused to log it (the user is told). Problems the user can fix
        are logged in the row and told to them, never raised; `problem` is one the caller found already. A blocked
        user gets a UserError before anything is logged or queued."""
        self.refuse_blocked(user.id)
        with self._tracked():
            return await self._run(request, output, kind, user, image, parent_id, notes, problem)

    async def rerun(self, row: Generation, output: Output, user: discord.abc.User, *, seed: int | None) -> None:
        """Run stored generation `row` again with `seed`, or with its stored seed: an exact reproduction. The
        caller has checked that `user` may (`access.may_rerun`)."""
        if seed is not None:
            notes = [f"Rerun of #{row.id} with seed {seed}."]
        elif row.seed is None:
            raise UserError(f"#{row.id} has no stored seed to reproduce: give one with the seed option.")
        else:
            seed, notes = row.seed, [f"Exact reproduction of #{row.id} with its stored seed."]
        request, changes = self.requests.stored_request(row, seed)
        await self.run(request, output, kind="reroll", user=user, parent_id=row.id, notes=[*notes, *changes])

    async def upscale(self, row: Generation, index: int, output: Output, user: discord.abc.User) -> None:
        """Image `index` of a result drawn again from its stored seed and parameters, through the hires fix at
        `[defaults] upscale`: a new result, whose row is a `reroll` of one image with the hires columns set. The
        caller has checked that `user` may (`access.may_rerun`)."""
        if index >= row.count:
            raise UserError(f"#{row.id} has no image {index + 1}.")
        request, changes = self.requests.stored_request(row, image_seed(row, index))
        defaults = self.settings.defaults
        request = replace(
            request,
            count=1,
            hires_scale=defaults.upscale,
            hires_strength=defaults.hires_strength,
            hires_upscaler=defaults.hires_upscaler,
        )
        notes = [f"Image {index + 1} of #{row.id}, upscaled {defaults.upscale:g}x.", *changes]
        await self.run(request, output, kind="reroll", user=user, parent_id=row.id, notes=notes)

    async def vary(self, row: Generation, index: int, output: Output, user: discord.abc.User, pressed: Any) -> None:
        """Variations of image `index` of a result: its attachment on the pressed message, or redrawn from its seed.
        The caller has checked that `user` may (`access.may_rerun`)."""
        name = render.image_name(row.id, index)
        attachment = next((a for a in pressed.attachments if a.filename == name), None) if pressed else None
        request = self.requests.variation_request(row.prompt, row)
        source: ImageSource | Redraw | None = attachment
        if attachment is None:  # left out for size, or the message lost it: draw it again from the stored seed
            seed = image_seed(row, index)
            # Never shown, only fed to the variation (which is checked itself): no need for the safety checker.
            source = Redraw(replace(self.requests.from_row(row, seed=seed), count=1, safety_check=False))
        await self.run(request, output, kind="variation", user=user, image=source, parent_id=row.id)

    async def resume(self, row: Generation, output: Output) -> None:
        """Run a generation that a crash interrupted again, from its row (back to queued, see
        `Store.recover_unfinished`): the stored parameters and seed, so the picture is the one it would have been.

        It is queued before the first await, so the resumed runs of a start keep their order, ahead of new requests.
        """
        with self._tracked():
            log.info("#%d resumed after a restart", row.id)
            # No stored seed only for a row that was never going to run; any seed then.
            try:
                seed = sdengine.random_seed(row.count) if row.seed is None else row.seed
                request = self.requests.from_row(row, seed=seed)
            except UserError as exc:
                sentence = str(exc)
                await output.reject(sentence)
                await self._save(row.id, lambda: self.store.mark_failed(row.id, sentence))
                return
            made = Place.of(row)
            # The cooldown cannot refuse it: at start-up no request has set one yet.
            await self._queue_and_follow(row.id, request, output, made, (), None, resumed=True)

    def refuse_blocked(self, user_id: int) -> None:
        """Raise the blocked sentence for a user an admin blocked. Their requests get no row: like the channel
        allowlist, a block refuses them before they become requests, so a blocked user cannot fill the database."""
        if self.store.is_blocked(user_id):
            raise UserError(BLOCKED)

    def cancel(self, gen_id: int) -> bool:
        """Cancel a queued or running generation; False if it is neither."""
        live = self.live.get(gen_id)
        if live is None:
            return False
        live.job.cancel()
        return True

    # ---- room in the queue ---------------------------------------------------------------------------------

    def room(self, user_id: int) -> str | None:
        """Why the queue would refuse one more request of `user_id` now, or None: checked before a download."""
        owner = str(user_id)
        limits = self.settings.limits
        mine = sum(live.job.owner == owner for live in self.live.values())
        if mine >= limits.max_pending_per_user:
            return (
                f"You already have {mine} requests waiting or running (the limit is {limits.max_pending_per_user}): "
                "wait for one to finish."
            )
        stats = self.executor.stats()
        if stats.down:
            return "The generator has stopped working: an admin must restart me."
        if stats.queued >= limits.max_queue:
            return f"The queue is full ({stats.queued} requests): try again in a few minutes."
        return None

    async def prune_init_images(self) -> None:
        """Apply the retention of stored init images (`[storage]`), so that the database cannot grow without bound."""
        storage = self.settings.storage
        try:
            pruned = await self.store.prune_init_images(
                max_age=storage.keep_init_images_days * 86_400, max_bytes=storage.max_init_images_mib * 2**20
            )
        except sqlite3.Error as exc:  # tried again after the next stored image
            log.warning("could not prune the stored init images: %s", exc)
            return
        if pruned:
            log.info("dropped %d stored init images past their retention", pruned)

    # ---- the run itself ------------------------------------------------------------------------------------

    async def _run(
        self,
        request: sdengine.GenerationRequest,
        output: Output,
        kind: Kind,
        user: discord.abc.User,
        image: ImageSource | Redraw | None,
        parent_id: int | None,
        notes: Sequence[str],
        problem: str | None,
    ) -> int | None:
        made = Place(user.id, output.guild_id, output.channel_id)
        # 1. Log the request, without its init image: a request refused below keeps its row and nothing more.
        #    Discord caps integer options at 2**53, but a forged or stale payload is only capped by Python: clamp
        #    what SQLite's 64-bit integers cannot hold; the reason keeps the value as sent.
        try:
            gen_id = await self.store.add(
                NewGeneration(
                    kind=kind,
                    user_id=user.id,
                    guild_id=output.guild_id,
                    channel_id=output.channel_id,
                    interaction_id=output.interaction.id if output.interaction else None,
                    source_id=output.source_id,
                    prompt=request.prompt,
                    negative=request.negative,
                    scheduler=request.scheduler,
                    steps=_int64(request.steps),
                    guidance=request.guidance,
                    width=request.width,
                    height=request.height,
                    count=_int64(request.count),
                    strength=request.strength if image is not None or request.image is not None else None,
                    seed=None if request.seed is None else _int64(request.seed),
                    model=request.model or self.settings.model.label,
                    init_image=request.image,
                    parent_id=parent_id,
                    hires_scale=request.hires_scale,
                    hires_strength=request.hires_strength if request.hires_scale is not None else None,
                    hires_steps=None if request.hires_steps is None else _int64(request.hires_steps),
                    hires_upscaler=request.hires_upscaler if request.hires_scale is not None else None,
                )
            )
        except sqlite3.Error as exc:
            log.warning("could not log a %s by user %s: %s", kind, user.id, exc)
            await output.reject(database_trouble(exc))
            return None
        log.info("#%d %s by user %s: %r (seed %s)", gen_id, kind, user.id, request.prompt, request.seed)

        # 2. Check it before any download: the limits, the cost, the cooldown and the room in the queue. A prompt
        #    left empty may still come from the image's own parameters, so the prompt is judged once that is known.
        if problem is None:
            pending = replace(request, prompt=request.prompt or "an image") if image is not None else request
            problem = self.policy.problem(pending, user.id) or self.room(user.id)

        # 3. Fetch the init image and keep it with the row.
        if problem is None and image is not None:
            try:
                init = await self._init_image(gen_id, image, made)
            except sdengine.Cancelled:
                await self._cancelled(gen_id, output)
                return gen_id
            except UserError as exc:
                problem = str(exc)
            else:
                width, height = request.width, request.height
                if not (width and height):
                    width, height = self.policy.image_size(init.width, init.height, request.model)
                prompt = request.prompt or prompt_in_png(init.data)
                request = replace(request, image=init.data, width=width, height=height, prompt=prompt)
                await self._save(
                    gen_id,
                    lambda: self.store.attach_image(gen_id, init.data, width=width, height=height, prompt=prompt),
                )
                await self.prune_init_images()

        await self._queue_and_follow(gen_id, request, output, made, notes, problem)
        return gen_id

    async def _init_image(self, gen_id: int, image: ImageSource | Redraw, made: Place) -> InitImage:
        if not isinstance(image, Redraw):
            return await self.downloader.fetch(image, made.user_id)
        try:
            job = self.executor.submit(image.request, owner=str(made.user_id))
        except sdengine.SDEngineError as exc:
            raise UserError(str(exc)) from exc
        self.live[gen_id] = LiveJob(job, made)
        try:
            result = await job.result()
        except sdengine.Cancelled:
            raise
        except sdengine.SDEngineError as exc:
            raise UserError(f"That image is no longer attached and I could not redraw it: {exc}") from exc
        finally:
            del self.live[gen_id]
        return InitImage(result.pngs[0], result.width, result.height)

    async def _queue_and_follow(
        self,
        gen_id: int,
        request: sdengine.GenerationRequest,
        output: Output,
        made: Place,
        notes: Sequence[str],
        problem: str | None,
        *,
        resumed: bool = False,
    ) -> None:
        """Steps 4 and 5 of a run, for a request with a row; `resume` starts here."""
        # 4. Validate and queue
        try:
            problem = problem or self.policy.problem(request, made.user_id)
            if problem is not None:
                raise UserError(problem)
            # Age-restricted channels take any result, so the checker only runs where it could change something.
            checked = self.policy.checks_safety(request.model) and not output.age_restricted
            job = self.executor.submit(replace(request, safety_check=checked), owner=str(made.user_id))
        except (UserError, sdengine.SDEngineError) as exc:  # the caps, a shutdown, a generator that is down
            log.info("#%d rejected: %s", gen_id, exc)
            sentence = str(exc)
            # The user first, the row after: a crash in between runs it again rather than leave them waiting.
            await output.reject(sentence)
            await self._save(gen_id, lambda: self.store.mark_failed(gen_id, sentence))
            return
        if not resumed:  # a run resumed after a restart is no new request: it starts no cooldown
            self.policy.accepted(made.user_id)

        # 5. Follow it to the end
        self.live[gen_id] = LiveJob(job, made)
        try:
            # A latent preview can show what the checker would black out: none where results are checked.
            await self._follow(gen_id, job, output, notes, previews=not checked)
        except Exception:
            log.exception("#%d failed in the bot", gen_id)
            await output.show(f"**#{gen_id}** · {SORRY}", final=True)
            await self._save(gen_id, lambda: self.store.mark_failed(gen_id, "internal error in the bot"))
        finally:
            del self.live[gen_id]
            if not job.finished:
                job.cancel()

    async def _follow(self, gen_id: int, job: Job, output: Output, notes: Sequence[str], *, previews: bool) -> None:
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
                    await self._save(gen_id, lambda: self.store.mark_running(gen_id), tries=1)
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
            await output.show(f"**#{gen_id}** · {reason}", final=True)  # the user first, as in _queue_and_follow
            await self._save(gen_id, lambda: self.store.mark_failed(gen_id, reason))
        elif isinstance(end, JobCancelled):
            await self._cancelled(gen_id, output)

    async def _cancelled(self, gen_id: int, output: Output) -> None:
        log.info("#%d cancelled", gen_id)
        await self._save(gen_id, lambda: self.store.mark_cancelled(gen_id))
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
            await self._save(gen_id, lambda: self.store.mark_failed(gen_id, reason))
            return
        await self._save(
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

    async def _save(self, gen_id: int, write: Callable[[], Awaitable[object]], *, tries: int = DB_TRIES) -> None:
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

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Count the current task as a run in flight, for `wait_idle`."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def wait_idle(self, timeout: float) -> None:
        """Wait for runs in flight to finish their bookkeeping (the executor has failed or finished their jobs)."""
        tasks = {task for task in self._tasks if task is not asyncio.current_task()}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def _grid_png(images: Sequence[Image.Image]) -> bytes:
    return render.png(render.grid(images))


def _int64(number: int) -> int:
    """`number` clamped into SQLite's signed 64-bit integers."""
    return max(-(2**63), min(number, 2**63 - 1))
