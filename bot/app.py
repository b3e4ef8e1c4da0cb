"""The bot: settings, store, model and executor wired together, with the cogs loaded on top.

Startup (`setup_hook`): open the store -> find the work a crash interrupted -> load the model -> start the executor
(with `[executor] backend = "ray"`: start the Ray workers, which load the model, unless `sdbot` started them already)
-> register the buttons -> run the interrupted work again -> load the cogs -> sync the slash commands.
Shutdown (`close`): refuse new requests -> stop the executor after its current step (it fails what is queued or
running, and each user is told) -> let runs finish their bookkeeping -> mark what never finished as failed -> close
the store -> disconnect.

After a crash or `kill -9` nothing is lost: the interrupted work runs again, or its user is told (bot/recovery.py).

Importing this module loads no torch: the executor is imported when the bot starts, and on the Ray backend the bot
process never loads torch at all.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

import sdengine
from bot.buttons import BUTTONS
from bot.config import Settings
from bot.generation import GenerationService
from bot.preflight import executor_config, load_models, start_cluster
from bot.recovery import MAX_ATTEMPTS, ResumedOutput, receipt, tell_interrupted
from bot.replies import BLOCKED, NO_PINGS, SORRY, Interaction, database_trouble, tell, user_message
from bot.rows import Received
from bot.store import Store

if TYPE_CHECKING:
    from sdengine.executor import Executor
    from sdengine.pool import ModelPool
    from sdengine.ray_cluster import Cluster
    from sdengine.ray_executor import RayExecutor

log = logging.getLogger(__name__)

EXTENSIONS = (
    "bot.cogs.imagine",
    "bot.cogs.variations",
    "bot.cogs.results",
    "bot.cogs.history",
    "bot.cogs.queue",
    "bot.cogs.models",
    "bot.cogs.admin",
)

# The commands that start a generation. Each is noted in the `received` table before the cog acknowledges it.
GENERATION_COMMANDS = ("imagine", "reroll", "Make variations")
# Seconds a command waits for that note to be written. It normally takes a millisecond; a database stuck longer
# (locked, disk full) must not make the bot miss Discord's 3-second deadline, so the command then goes on without.
RECEIPT_WAIT = 1.0
STOPPING = "I am shutting down for a moment: try again in a minute."


def intents(message_content: bool = False) -> discord.Intents:
    """The least the bot needs: guilds (channels and permissions), and messages in guilds and DMs for replies to
    images. No privileged intent by default: Discord shows the content of messages that mention the bot anyway,
    but not the attachments of other people's messages that they reply to; `message_content` (opt-in, and granted
    in the developer portal) shows those too."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    wanted.message_content = message_content
    return wanted


class Tree(app_commands.CommandTree["SDBot"]):
    """The first and last word on every app command: the channel allowlist, and errors as one plain sentence."""

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        refusal = self.client.refusal(interaction.guild_id, interaction.channel)
        if refusal is not None:
            await tell(interaction, refusal)
            return False
        data: dict[str, Any] = dict(interaction.data or {})
        command = str(data.get("name", ""))
        if interaction.type is discord.InteractionType.application_command and command in GENERATION_COMMANDS:
            prompt = next((o.get("value") for o in data.get("options", ()) if o.get("name") == "prompt"), "")
            await self.client.note_received(receipt(interaction, command, str(prompt)))
        return True

    async def on_error(self, interaction: Interaction, error: app_commands.AppCommandError, /) -> None:
        await self.client.forget_received(interaction.id)
        if interaction.extras.get("error_handled"):  # a cog's handler already answered
            return
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        sentence = user_message(original)
        if sentence is None:
            command = interaction.command.qualified_name if interaction.command else "?"
            log.error("/%s failed for user %s", command, interaction.user.id, exc_info=original)
        await tell(interaction, sentence or SORRY)


class SDBot(commands.Bot):
    """Pass `model` to reuse an already loaded model or pool of them (`sdbot` and tests do); otherwise `setup_hook`
    loads `settings.model` (or every `[models.NAME]`). With
    `[executor] backend = "ray"`, pass `cluster` to use workers already started (`sdbot` does, before it logs in);
    otherwise `setup_hook` starts them, and `close` stops them."""

    def __init__(
        self,
        settings: Settings,
        *,
        model: sdengine.Model | ModelPool | None = None,
        cluster: Cluster | None = None,
        progress_interval: float = 2.0,
        **options: Any,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,  # required by commands.Bot; no prefix commands exist
            help_command=None,
            intents=intents(settings.discord.message_content),
            allowed_mentions=NO_PINGS,
            tree_cls=Tree,
            **options,
        )
        self.settings = settings
        self.progress_interval = progress_interval
        self._given = model
        self._models: dict[str, sdengine.ModelInfo] = {}  # what the bot knows of each model: names and sizes
        self._cluster = cluster
        self._owns_cluster = False
        self._store: Store | None = None
        self._executor: Executor | RayExecutor | None = None
        self._generations: GenerationService | None = None
        self._background: set[asyncio.Task[None]] = set()  # recovery and receipts: awaited by close()
        self._closed = False
        self._store_closed = False

    # Set up by setup_hook; the cogs only run after it.
    @property
    def models(self) -> dict[str, sdengine.ModelInfo]:
        """Each model by the name users pick it by: its names and sizes (on the Ray backend, as the workers say)."""
        assert self._models, "setup_hook has not loaded the models"
        return self._models

    @property
    def store(self) -> Store:
        assert self._store is not None, "setup_hook has not opened the store"
        return self._store

    @property
    def executor(self) -> Executor | RayExecutor:
        assert self._executor is not None, "setup_hook has not started the executor"
        return self._executor

    @property
    def generations(self) -> GenerationService:
        assert self._generations is not None, "setup_hook has not started the generation service"
        return self._generations

    async def setup_hook(self) -> None:
        settings = self.settings
        self._store = await Store.open(settings.storage.database)
        # Before anything new can arrive: what the last run left unfinished, and what it never logged.
        rerun, given_up = await self._store.recover_unfinished(max_attempts=MAX_ATTEMPTS)
        lost = await self._store.lost_received()
        if rerun or given_up or lost:
            log.warning(
                "the last run stopped uncleanly: %d generations run again, %d given up, %d commands never logged",
                len(rerun),
                len(given_up),
                len(lost),
            )

        if settings.executor.backend == "ray":
            self._executor = await self._start_ray()
        else:
            self._executor = await self._start_local()
        self._generations = GenerationService(
            settings, self._store, self._executor, self.models, progress_interval=self.progress_interval
        )
        await self._generations.prune_init_images()
        self.add_dynamic_items(*BUTTONS)

        # The tasks start in this order, and each queues its job before its first await: the resumed runs keep
        # their order, ahead of anything that arrives once the gateway connects.
        for row in rerun:
            channel = self.get_partial_messageable(row.channel_id, guild_id=row.guild_id)
            self._spawn(self._generations.resume(row, ResumedOutput(channel, row)))
        if given_up or lost:
            self._spawn(tell_interrupted(self, self.store, given_up, lost))

        for extension in EXTENSIONS:
            try:
                await self.load_extension(extension)
            except Exception:
                log.exception("could not load %s; the bot runs without it", extension)
        await self._sync_commands()

    async def _start_local(self) -> Executor:
        from sdengine.executor import Executor  # loads torch: only the bot that runs the model needs it
        from sdengine.pool import ModelPool

        settings = self.settings
        if self._given is None:
            log.info("loading %d model(s) on %s", len(settings.all_models), settings.model.device)
            pool = await asyncio.to_thread(load_models, settings)
        elif isinstance(self._given, ModelPool):
            pool = self._given
        else:
            pool = ModelPool.of(self._given, settings.model.label)
        self._models = pool.infos
        return Executor(pool, executor_config(settings))

    async def _start_ray(self) -> RayExecutor:
        """The executor on the Ray workers; the bot process loads no model and no torch."""
        from sdengine.ray_executor import RayExecutor

        if self._cluster is None:
            self._cluster = await asyncio.to_thread(start_cluster, self.settings)
            self._owns_cluster = True
        self._models = {self.settings.model.label: self._cluster.info}
        return RayExecutor(self._cluster, executor_config(self.settings))

    async def _sync_commands(self) -> None:
        """To the configured guilds (instant), or globally (Discord may take up to an hour to show them)."""
        guild_ids = self.settings.discord.guild_ids
        try:
            if not guild_ids:
                await self.tree.sync()
            for guild_id in guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        except discord.HTTPException:
            log.exception("could not sync the slash commands; the ones synced before stay in place")

    def refusal(self, guild_id: int | None, channel: object) -> str | None:
        """Why the bot does not work in this place, as a sentence for the user; None where it does."""
        if self._closed:
            return STOPPING
        config = self.settings.discord
        if guild_id is None:
            if config.allowed_guild_ids or config.allowed_channel_ids or config.nsfw_channels_only:
                return "I only work in servers here, not in direct messages."
            return None
        if config.allowed_guild_ids and guild_id not in config.allowed_guild_ids:
            return "I am not enabled in this server."
        # A thread counts as its parent channel.
        ids = {getattr(channel, "id", None), getattr(channel, "parent_id", None)}
        if config.allowed_channel_ids and not ids & set(config.allowed_channel_ids):
            return "I am not enabled in this channel: ask an admin where to use me."
        is_nsfw = getattr(channel, "is_nsfw", None)
        if config.nsfw_channels_only and not (callable(is_nsfw) and is_nsfw()):
            return "I only post pictures in age-restricted channels here."
        return None

    async def not_blocked(self, interaction: Interaction) -> bool:
        """A cog's `interaction_check`: blocked users get one sentence instead of the command. From memory, so it
        never delays the acknowledgement."""
        if not self.store.is_blocked(interaction.user.id):
            return True
        interaction.extras["error_handled"] = True  # answered here: the tree's on_error stays quiet on the CheckFailure
        await tell(interaction, BLOCKED)
        return False

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: replies to images are handled by the variations cog's listener."""

    # ---- crash recovery ------------------------------------------------------------------------------------

    async def note_received(self, note: Received) -> None:
        """Note something that starts a generation in the store before it is acknowledged (or right after, for a
        button), so that a crash before its generation row is written still leaves a trace to report."""
        write = self._spawn(self.store.add_received(note))
        await asyncio.wait({write}, timeout=RECEIPT_WAIT)  # no cancel on timeout: the note is still written

    async def forget_received(self, source_id: int) -> None:
        """It is finished (its user got an answer): its note is no longer needed."""
        if self._store is None or self._store_closed:  # at start-up, a note whose row exists is dropped anyway
            return
        try:
            await self._store.forget_received(source_id)
        except sqlite3.Error as exc:  # harmless: at start-up, a note whose row exists is dropped
            log.warning("could not drop the note of %s: %s", source_id, exc)

    async def on_app_command_completion(self, interaction: Interaction, command: object) -> None:
        await self.forget_received(interaction.id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background; close() waits for it, and a failure is logged."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, sqlite3.Error):  # a note the database refused: the command goes on without it
            log.warning("a background write failed: %s (%s)", error, database_trouble(error))
        elif error is not None:
            log.error("a background task failed", exc_info=error)

    # ---- shutdown --------------------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # from now on refusal() turns every new request away
        log.info("shutting down: new requests are refused; the current step finishes and the rest is failed")
        if self._executor is not None:
            await self._executor.shutdown()  # fails what is queued or running, with a reason
        if self._generations is not None:
            await self._generations.wait_idle(timeout=10)
            await self._generations.downloader.close()
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)
        if self._background:  # stuck past the timeout (e.g. on a locked database): give up on them
            for task in self._background:
                task.cancel()
            await asyncio.wait(set(self._background))
        if self._cluster is not None and self._owns_cluster:
            await asyncio.to_thread(self._cluster.close)
        if self._store is not None:
            try:
                await self._store.fail_unfinished("The bot shut down before this request finished.")
            except sqlite3.Error as exc:  # they stay unfinished and run again at the next start
                log.warning("could not mark the unfinished generations: %s", exc)
            self._store_closed = True
            await self._store.close()
        await super().close()
