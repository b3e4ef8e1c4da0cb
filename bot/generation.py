"""Run one generation end to end, whatever started it: a slash command, a reply, a context menu or a button.

    log the row -> check it (limits, cost, cooldown, caps) -> fetch the init image -> executor.submit
    -> progress edits -> result + buttons -> mark the row

Every request gets its row before anything can go wrong, so a refused one is logged with its reason too; and it is
refused before anything is downloaded, so a refusal costs nothing but that row. Once queued, a job is followed to
its end by `Delivery` (bot/delivery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import discord

import sdengine
from bot import render
from bot.access import Place
from bot.config import Settings
from bot.delivery import Delivery, save
from bot.download import Downloader, ImageSource, InitImage
from bot.output import Output
from bot.policy import Policy
from bot.replies import BLOCKED, SORRY, UserError, database_trouble
from bot.requests import Requests, image_seed
from bot.rows import Generation, Kind, NewGeneration
from bot.store import Store
from sdengine.jobs import Job

if TYPE_CHECKING:  # the executor modules load torch or Ray; the bot only holds one, made by the app
    from sdengine.executor import Executor
    from sdengine.ray_executor import RayExecutor

log = logging.getLogger(__name__)


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
        self.policy = Policy(settings, models)
        self.requests = Requests(settings, models)
        self.downloader = Downloader(settings.limits.max_image_bytes)
        self.delivery = Delivery(settings, store, models, progress_interval=progress_interval)
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
                await save(row.id, lambda: self.store.mark_failed(row.id, sentence))
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
                await self.delivery.cancelled(gen_id, output)
                return gen_id
            except UserError as exc:
                problem = str(exc)
            else:
                width, height = request.width, request.height
                if not (width and height):
                    width, height = self.policy.image_size(init.width, init.height, request.model)
                prompt = request.prompt or prompt_in_png(init.data)
                request = replace(request, image=init.data, width=width, height=height, prompt=prompt)
                await save(
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
            await save(gen_id, lambda: self.store.mark_failed(gen_id, sentence))
            return
        if not resumed:  # a run resumed after a restart is no new request: it starts no cooldown
            self.policy.accepted(made.user_id)

        # 5. Follow it to the end
        self.live[gen_id] = LiveJob(job, made)
        try:
            # A latent preview can show what the checker would black out: none where results are checked.
            await self.delivery.follow(gen_id, job, output, notes, previews=not checked)
        except Exception:
            log.exception("#%d failed in the bot", gen_id)
            await output.show(f"**#{gen_id}** · {SORRY}", final=True)
            await save(gen_id, lambda: self.store.mark_failed(gen_id, "internal error in the bot"))
        finally:
            del self.live[gen_id]
            if not job.finished:
                job.cancel()

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


def _int64(number: int) -> int:
    """`number` clamped into SQLite's signed 64-bit integers."""
    return max(-(2**63), min(number, 2**63 - 1))
