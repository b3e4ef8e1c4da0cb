"""Run one generation end to end, whatever started it: a slash command, a reply, a context menu or a button.

    fetch the init image -> log the row -> validate -> executor.submit -> progress edits -> result + buttons

Every request gets its row before anything can go wrong, so a rejected one is logged with its reason too.
`Output` hides where the messages go: the interaction's response while its token lives, else a channel message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import discord
from PIL import Image

import sdengine
from bot import render
from bot.config import Settings
from bot.render import File
from bot.store import Generation, Kind, NewGeneration, Store
from bot.views import (
    BLOCKED,
    NO_PINGS,
    SORRY,
    Interaction,
    UserError,
    plain,
    progress_view,
    random_seed,
    result_view,
    tell,
)
from sdengine.executor import Done, Executor, Failed, Job, JobCancelled, Queued, QueueFull, ShuttingDown, Started, Step

log = logging.getLogger(__name__)

TOKEN_LIFETIME = dt.timedelta(minutes=14)  # Discord's is 15; keep a margin for a slow upload
# A status write that fails (the database locked past its busy_timeout, or the disk full) is tried this often, this
# many seconds apart. The run goes on meanwhile: a row left unfinished is run again after the next restart.
DB_TRIES = 3
DB_RETRY_DELAY = 1.0
DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")

ImageSource = discord.Attachment | str  # an attachment, or the URL of an embed's image


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _file(name: str, data: bytes) -> discord.File:
    return discord.File(io.BytesIO(data), filename=name)


def _token_gone(error: discord.HTTPException) -> bool:
    """401 / 50027 Invalid Webhook Token, or 10015 Unknown Webhook: the interaction can no longer post."""
    return error.status == 401 or error.code in (50027, 10015)


def prompt_in_png(data: bytes) -> str:
    """The prompt a PNG carries in its A1111 `parameters` (its first line), or ""."""
    try:
        parameters = sdengine.read_parameters(data)
    except Exception:  # not a PNG, or a broken one: no prompt to reuse
        return ""
    return parameters.split("\n", 1)[0].strip() if parameters else ""


class Output:
    """Where one generation shows its progress and its result, and tells the user what went wrong.

    For an interaction, that is its response while the 15-minute token lives, then a message in the channel.
    For a message (a reply to an image), it is a reply to that message, edited as the generation goes.
    """

    def __init__(
        self,
        channel: discord.abc.Messageable | None,
        *,
        channel_id: int,
        guild_id: int | None,
        filesize_limit: int,
        interaction: Interaction | None = None,
        reply_to: discord.Message | None = None,
    ) -> None:
        self.channel_id = channel_id
        self.guild_id = guild_id
        self.filesize_limit = filesize_limit
        self.interaction = interaction
        self.message: discord.Message | None = None  # our own channel message, once we post one
        self._channel = channel
        self._reply_to = reply_to
        self._token_dead = interaction is None
        self._progress_broken = False  # an edit failed (message deleted, no permission): stop progress edits

    @classmethod
    def for_interaction(cls, interaction: Interaction) -> Output:
        channel = interaction.channel
        return cls(
            channel if isinstance(channel, discord.abc.Messageable) else None,
            channel_id=interaction.channel_id or 0,
            guild_id=interaction.guild_id,
            filesize_limit=interaction.filesize_limit,
            interaction=interaction,
        )

    @classmethod
    def for_message(cls, message: discord.Message) -> Output:
        guild = message.guild
        return cls(
            message.channel,
            channel_id=message.channel.id,
            guild_id=guild.id if guild else None,
            filesize_limit=guild.filesize_limit if guild else DEFAULT_FILESIZE_LIMIT,
            reply_to=message,
        )

    @property
    def interaction_id(self) -> int | None:
        return self.interaction.id if self.interaction else None

    @property
    def age_restricted(self) -> bool:
        """Whether the channel is marked age-restricted (NSFW) in Discord; a thread follows its parent."""
        is_nsfw = getattr(self._channel, "is_nsfw", None)
        return callable(is_nsfw) and bool(is_nsfw())

    async def show(
        self, content: str, files: Sequence[File] = (), view: discord.ui.View | None = None, *, final: bool = False
    ) -> discord.Message | None:
        """Put `content`, `files` and `view` on the message. Progress (`final=False`) is best effort: after an
        error it stops. A final message that cannot replace the progress message is posted as a new one."""
        if self._progress_broken and not final:
            return None
        try:
            return await self._put(content, files, view)
        except discord.HTTPException as exc:
            log.warning("could not update the message in channel %s: %s", self.channel_id, exc)
            if not final:
                self._progress_broken = True
                return None
        self._token_dead, self.message = True, None
        try:
            return await self._put(content, files, view)
        except discord.HTTPException as exc:
            log.warning("could not post the result in channel %s: %s", self.channel_id, exc)
            return None

    async def _put(self, content: str, files: Sequence[File], view: discord.ui.View | None) -> discord.Message:
        interaction = self.interaction
        if interaction is not None and not self._token_dead:
            if discord.utils.utcnow() - interaction.created_at < TOKEN_LIFETIME:
                try:
                    return await interaction.edit_original_response(
                        content=content,
                        attachments=[_file(name, data) for name, data in files],
                        view=view,
                        allowed_mentions=NO_PINGS,
                    )
                except discord.HTTPException as exc:
                    if not _token_gone(exc):
                        raise
                    log.info("interaction %s can no longer post (%s): using the channel", interaction.id, exc)
            self._token_dead = True
        if self.message is not None:
            return await self.message.edit(
                content=content,
                attachments=[_file(name, data) for name, data in files],
                view=view,
                allowed_mentions=NO_PINGS,
            )
        if self._channel is None:
            raise discord.ClientException("there is no channel to post in")
        extra: dict[str, Any] = {}
        if view is not None:
            extra["view"] = view
        if self._reply_to is not None:
            extra["reference"] = self._reply_to.to_reference(fail_if_not_exists=False)
            extra["mention_author"] = False
        self.message = await self._channel.send(
            content, files=[_file(name, data) for name, data in files], allowed_mentions=NO_PINGS, **extra
        )
        return self.message

    async def reject(self, sentence: str) -> None:
        """Tell the user one plain sentence: ephemeral for an interaction, a reply for a message."""
        if self.interaction is not None:
            await tell(self.interaction, sentence)
        else:
            await self.show(plain(sentence), final=True)


class _Painter:
    """Shows the latest progress at most once per `interval` seconds, without holding up the event reader."""

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
            await self._task


class GenerationService:
    """Runs generations for every entry point and keeps the jobs in flight, by generation id."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        executor: Executor,
        model: sdengine.Model,
        *,
        progress_interval: float = 2.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.executor = executor
        self.model = model
        self.progress_interval = progress_interval
        self.jobs: dict[int, Job] = {}  # generation id -> its job, while queued or running
        self._last_submit: dict[int, float] = {}  # user id -> time.monotonic() of their last accepted request
        self._tasks: set[asyncio.Task[Any]] = set()

        # The NSFW policy: check results with the model's safety checker (unless configured off), and black out
        # what it flags outside age-restricted channels. Without one, discord.nsfw_channels_only is the only guard.
        checker = settings.safety.checker
        if checker == "on" and model.safety_checker is None:
            raise sdengine.ModelLoadError(
                f'safety.checker is "on" but the model {model.name!r} has no safety_checker and feature_extractor '
                'folders: use a model folder that has them, or set safety.checker to "auto" or "off".'
            )
        self.safety_checks = checker != "off" and model.safety_checker is not None
        if not self.safety_checks and not settings.discord.nsfw_channels_only:
            log.warning(
                "no NSFW safety checker runs and discord.nsfw_channels_only is false: "
                "results are posted unfiltered in every allowed channel"
            )

    # ---- entry points ------------------------------------------------------------------------------------

    async def run(
        self,
        request: sdengine.GenerationRequest,
        output: Output,
        *,
        kind: Kind,
        user: discord.abc.User,
        image: ImageSource | None = None,
        parent_id: int | None = None,
        notes: Sequence[str] = (),
        problem: str | None = None,
    ) -> int | None:
        """Run `request` (with the init image from `image`, if given) and show it on `output`; returns the
        generation id, or None when the database refused to log it (the user is told). Problems the user can fix
        are logged in the row and told to them, never raised; `problem` is one the caller found already. A blocked
        user gets a UserError before anything is downloaded, logged or queued."""
        await self.refuse_blocked(user.id)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            return await self._run(request, output, kind, user, image, parent_id, notes, problem)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def rerun(self, interaction: Interaction, gen_id: int, *, seed: int | None) -> None:
        """Run stored generation `gen_id` again with `seed`, or with its stored seed: an exact reproduction."""
        await self.refuse_blocked(interaction.user.id)
        row = await self.store.get(gen_id)
        if row is None:
            raise UserError(f"There is no generation #{gen_id}.")
        if seed is not None:
            notes = [f"Rerun of #{row.id} with seed {seed}."]
        elif row.seed is None:
            raise UserError(f"#{row.id} has no stored seed to reproduce: give one with the seed option.")
        else:
            seed, notes = row.seed, [f"Exact reproduction of #{row.id} with its stored seed."]
            if row.model != self.model.name:
                notes.append(
                    f"#{row.id} was made with model {row.model!r} and this is {self.model.name!r}, "
                    "so the picture will differ."
                )
        request = self.request_from_row(row, seed=seed)
        await self.run(
            request,
            Output.for_interaction(interaction),
            kind="reroll",
            user=interaction.user,
            parent_id=row.id,
            notes=notes,
        )

    async def vary(self, interaction: Interaction, gen_id: int, index: int) -> None:
        """Variations of image `index` of a result: its attachment on the pressed message, or redrawn from its seed."""
        await self.refuse_blocked(interaction.user.id)  # before a redraw could spend GPU time on them
        row = await self.store.get(gen_id)
        if row is None:
            raise UserError(f"There is no generation #{gen_id}.")
        name = render.image_name(gen_id, index)
        message = interaction.message
        attachment = next((a for a in message.attachments if a.filename == name), None) if message else None
        request = self.variation_request(row.prompt, row)
        if attachment is None:  # left out for size, or the message lost it: draw it again from the stored seed
            request = replace(request, image=await self._redraw(row, index, str(interaction.user.id)))
        await self.run(
            request,
            Output.for_interaction(interaction),
            kind="variation",
            user=interaction.user,
            image=attachment,
            parent_id=row.id,
        )

    async def resume(self, row: Generation, output: Output) -> None:
        """Run a generation that a crash interrupted again, from its row (back to queued, see
        `Store.recover_unfinished`): the stored parameters and seed, so the picture is the one it would have been.

        It is queued before the first await, so the resumed runs of a start keep their order, ahead of new requests.
        """
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            log.info("#%d resumed after a restart", row.id)
            # No stored seed only for a row that was never going to run; any seed then.
            request = self.request_from_row(row, seed=random_seed() if row.seed is None else row.seed)
            # The cooldown cannot refuse it: at start-up no request has set one yet.
            await self._queue_and_follow(row.id, request, output, row.user_id, (), None, resumed=True)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def refuse_blocked(self, user_id: int) -> None:
        """Raise the blocked sentence for a user an admin blocked. Their requests get no row: like the channel
        allowlist, a block refuses them before they become requests, so a blocked user cannot fill the database."""
        if await self.store.is_blocked(user_id):
            raise UserError(BLOCKED)

    def cancel(self, gen_id: int) -> bool:
        """Cancel a queued or running generation; False if it is neither."""
        job = self.jobs.get(gen_id)
        if job is None:
            return False
        job.cancel()
        return True

    # ---- requests ------------------------------------------------------------------------------------------

    def request_from_row(self, row: Generation, *, seed: int) -> sdengine.GenerationRequest:
        """The request that made `row`, with `seed`; a variation keeps its stored init image."""
        return sdengine.GenerationRequest(
            prompt=row.prompt,
            negative=row.negative,
            scheduler=row.scheduler,
            steps=row.steps,
            guidance=row.guidance,
            seed=seed,
            width=row.width,
            height=row.height,
            count=row.count,
            image=row.init_image,
            strength=row.strength if row.strength is not None else self.settings.defaults.strength,
        )

    def variation_request(self, prompt: str, source: Generation | None) -> sdengine.GenerationRequest:
        """Image-to-image from an image (attached later by `run`), with the settings of the generation that made it
        when known, else the defaults. The size follows the image."""
        base = source or self.settings.defaults
        return sdengine.GenerationRequest(
            prompt,
            negative=base.negative,
            scheduler=base.scheduler,
            steps=base.steps,
            guidance=base.guidance,
            seed=random_seed(),
            count=source.count if source else 1,
            strength=self.settings.defaults.strength,
        )

    def problem(self, request: sdengine.GenerationRequest, user_id: int) -> str | None:
        """Why `request` may not run here, in one sentence; None if it may."""
        try:
            sdengine.check_inputs(self.model, request)
        except sdengine.InvalidRequest as exc:
            return str(exc)
        limits = self.settings.limits
        if request.steps > limits.max_steps:
            return f"Steps can be at most {limits.max_steps} here, not {request.steps}."
        if request.count > limits.max_count:
            return f"At most {limits.max_count} images per request here, not {request.count}."
        for name, side in (("width", request.width), ("height", request.height)):
            if side is not None and side > limits.max_side:
                return f"The {name} can be at most {limits.max_side} pixels here, not {side}."
        # An init image's size is only known in the worker; it keeps about the native area, so cost that.
        width = request.width or self.model.native_size
        height = request.height or self.model.native_size
        if width * height * request.steps * request.count > limits.max_cost:
            images = "1 image" if request.count == 1 else f"{request.count} images"
            return (
                f"{images} of {width}x{height} at {request.steps} steps is more work than allowed here: "
                "lower the steps, the size or the count."
            )
        return self.cooldown(user_id)

    def cooldown(self, user_id: int) -> str | None:
        """The cooldown sentence while the user must still wait after their last accepted request, else None."""
        wait = self._last_submit.get(user_id, -math.inf) + self.settings.limits.cooldown_seconds - time.monotonic()
        if wait > 0:
            return f"You are on cooldown: try again in {math.ceil(wait)} s."
        return None

    # ---- images -----------------------------------------------------------------------------------------

    async def fetch_image(self, source: ImageSource) -> bytes:
        """Download an init image, checking its size and type before and its contents after."""
        limit = self.settings.limits.max_image_bytes
        if isinstance(source, discord.Attachment):
            if source.size > limit:
                raise UserError(f"The image is {_mib(source.size)}: attach one under {_mib(limit)}.")
            content_type = (source.content_type or "").split(";")[0].strip()
            if not (content_type.startswith("image/") or source.filename.lower().endswith(IMAGE_SUFFIXES)):
                raise UserError("That file is not an image: attach a PNG, JPEG, WebP or GIF.")
            try:
                data = await source.read()
            except discord.HTTPException as exc:
                raise UserError("I could not download that image: attach it again.") from exc
        else:
            data = await _download(source, limit)
        try:
            await asyncio.to_thread(sdengine.decode_image, data, max_bytes=limit)
        except sdengine.InvalidRequest as exc:  # reported now, not after waiting in the queue
            raise UserError(str(exc)) from exc
        return data

    async def _redraw(self, row: Generation, index: int, owner: str) -> bytes:
        seed = row.seeds[index] if index < len(row.seeds) else (row.seed or 0) + index
        # Never shown, only fed to the variation (which is checked itself): no need for the safety checker.
        request = replace(self.request_from_row(row, seed=seed), count=1, safety_check=False)
        try:
            result = await self.executor.submit(request, owner=owner).result()
        except sdengine.SDEngineError as exc:
            raise UserError(f"That image is no longer attached and I could not redraw it: {exc}") from exc
        return result.pngs[0]

    # ---- the run itself ------------------------------------------------------------------------------------

    async def _run(
        self,
        request: sdengine.GenerationRequest,
        output: Output,
        kind: Kind,
        user: discord.abc.User,
        image: ImageSource | None,
        parent_id: int | None,
        notes: Sequence[str],
        problem: str | None,
    ) -> int | None:
        # 1. Fetch the init image; a bad file is logged and reported like any other bad input. A user on cooldown
        #    is refused first, so repeating a request with a big attachment costs no downloads.
        problem = problem or self.cooldown(user.id)
        if image is not None and problem is None:
            try:
                request = replace(request, image=await self.fetch_image(image))
            except UserError as exc:
                problem = str(exc)
        if request.image is not None and not request.prompt.strip():
            request = replace(request, prompt=prompt_in_png(request.image))

        # 2. Log the request. Discord caps integer options at 2**53, but a forged or stale payload is only capped
        #    by Python: clamp what SQLite's 64-bit integers cannot hold; the reason keeps the value as sent.
        try:
            gen_id = await self.store.add(
                NewGeneration(
                    kind=kind,
                    user_id=user.id,
                    guild_id=output.guild_id,
                    channel_id=output.channel_id,
                    interaction_id=output.interaction_id,
                    prompt=request.prompt,
                    negative=request.negative,
                    scheduler=request.scheduler,
                    steps=_int64(request.steps),
                    guidance=request.guidance,
                    width=request.width,
                    height=request.height,
                    count=_int64(request.count),
                    strength=request.strength if request.image is not None else None,
                    seed=None if request.seed is None else _int64(request.seed),
                    model=self.model.name,
                    init_image=request.image,
                    parent_id=parent_id,
                )
            )
        except sqlite3.Error as exc:
            log.warning("could not log a %s by user %s: %s", kind, user.id, exc)
            await output.reject(database_trouble(exc))
            return None
        log.info("#%d %s by user %s: %r (seed %s)", gen_id, kind, user.id, request.prompt, request.seed)

        await self._queue_and_follow(gen_id, request, output, user.id, notes, problem)
        return gen_id

    async def _queue_and_follow(
        self,
        gen_id: int,
        request: sdengine.GenerationRequest,
        output: Output,
        user_id: int,
        notes: Sequence[str],
        problem: str | None,
        *,
        resumed: bool = False,
    ) -> None:
        """Steps 3 and 4 of a run, for a request with a row; `resume` starts here."""
        # 3. Validate and queue
        try:
            problem = problem or self.problem(request, user_id)
            if problem is not None:
                raise UserError(problem)
            # Age-restricted channels take any result, so the checker only runs where it could change something.
            checked = self.safety_checks and not output.age_restricted
            job = self.executor.submit(replace(request, safety_check=checked), owner=str(user_id))
        except (UserError, QueueFull, ShuttingDown) as exc:
            log.info("#%d rejected: %s", gen_id, exc)
            sentence = str(exc)
            # The user first, the row after: a crash in between runs it again rather than leave them waiting.
            await output.reject(sentence)
            await self._save(gen_id, lambda: self.store.mark_failed(gen_id, sentence))
            return
        if not resumed:  # a run resumed after a restart is no new request: it starts no cooldown
            self._last_submit[user_id] = time.monotonic()

        # 4. Follow it to the end
        self.jobs[gen_id] = job
        try:
            # A latent preview can show what the checker would black out: none where results are checked.
            await self._follow(gen_id, job, output, notes, previews=not checked)
        except Exception:
            log.exception("#%d failed in the bot", gen_id)
            await output.show(f"**#{gen_id}** · {SORRY}", final=True)
            await self._save(gen_id, lambda: self.store.mark_failed(gen_id, "internal error in the bot"))
        finally:
            del self.jobs[gen_id]
            if not job.finished:
                job.cancel()

    async def _follow(self, gen_id: int, job: Job, output: Output, notes: Sequence[str], *, previews: bool) -> None:
        painter = _Painter(output, progress_view(gen_id), self.progress_interval)
        preview: list[File] = []
        end: Done | Failed | JobCancelled | None = None
        try:
            async for event in job.events():
                if isinstance(event, Queued):
                    painter.paint(render.queued_text(gen_id, event.position, event.length), preview)
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
        pictures, pngs, safety_notes = await asyncio.to_thread(_black_out_flagged, result)
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
        message = await output.show(content, kept, result_view(gen_id, len(result.pngs)), final=True)
        await self._save(
            gen_id,
            lambda: self.store.mark_done(
                gen_id,
                seeds=result.seeds,
                width=result.width,
                height=result.height,
                timings=result.timings,
                notices=[*result.notices, *safety_notes],
                message_id=message.id if message else None,
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

    async def wait_idle(self, timeout: float) -> None:
        """Wait for runs in flight to finish their bookkeeping (the executor has failed or finished their jobs)."""
        tasks = {task for task in self._tasks if task is not asyncio.current_task()}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def database_trouble(error: sqlite3.Error) -> str:
    """The sentence for a user whose request the database refused: busy (another program holds its lock longer
    than the busy_timeout), or not writable (the disk is full, or an I/O error)."""
    if getattr(error, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "My database is busy, so I could not take your request: try again in a minute."
    return "My database cannot be written to right now (the disk may be full), so I could not take your request."


def _grid_png(images: Sequence[Image.Image]) -> bytes:
    return render.png(render.grid(images))


def _black_out_flagged(result: sdengine.GenerationResult) -> tuple[list[Image.Image], list[bytes], list[str]]:
    """The result's images and PNGs with those the safety checker flagged replaced by black, and a note that says so.

    The engine only flags; it ran the checker only where the destination is not age-restricted."""
    flagged = [i for i, flag in enumerate(result.nsfw) if flag]
    if not flagged:
        return list(result.images), list(result.pngs), []
    images, pngs = list(result.images), list(result.pngs)
    for i in flagged:
        images[i] = Image.new("RGB", images[i].size)  # black; the message and the row keep the parameters
        pngs[i] = render.png(images[i])
    numbers = ", ".join(str(i + 1) for i in flagged)
    if len(images) == 1:
        subject = "The image was"
    else:
        subject = (
            f"Image {numbers} of {len(images)} was" if len(flagged) == 1 else f"Images {numbers} of {len(images)} were"
        )
    note = (
        f"{subject} flagged as NSFW by the safety checker and blacked out: "
        "such results only show in age-restricted channels."
    )
    return images, pngs, [note]


def _int64(number: int) -> int:
    """`number` clamped into SQLite's signed 64-bit integers."""
    return max(-(2**63), min(number, 2**63 - 1))


async def _download(url: str, limit: int) -> bytes:
    """An embed's image, read up to `limit` bytes: there is no size to check before downloading it."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            response.raise_for_status()
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                data += chunk
                if len(data) > limit:
                    raise UserError(f"The image is over {_mib(limit)}: use a smaller one.")
    except aiohttp.ClientError as exc:
        raise UserError("I could not download that image: attach it instead.") from exc
    return bytes(data)
