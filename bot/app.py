"""The bot: settings, store, model and executor wired together, with the cogs loaded on top.

Startup (`setup_hook`): open the store -> load the model -> start the executor -> register the buttons -> load the
cogs -> sync the slash commands. Shutdown (`close`): stop the executor -> let runs finish their bookkeeping ->
mark what never finished as failed -> close the store -> disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

import sdengine
from bot.config import Settings
from bot.generation import GenerationService
from bot.store import Store
from bot.views import BUTTONS, NO_PINGS, SORRY, Interaction, tell, user_message
from sdengine.executor import Executor, ExecutorConfig

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.imagine", "bot.cogs.variations", "bot.cogs.history", "bot.cogs.queue")


def intents() -> discord.Intents:
    """The least the bot needs: guilds (channels and permissions), and messages in guilds and DMs for replies to
    images. No privileged intent: Discord shows the content of messages that mention the bot anyway."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    return wanted


class Tree(app_commands.CommandTree["SDBot"]):
    """The first and last word on every app command: the channel allowlist, and errors as one plain sentence."""

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        refusal = self.client.refusal(interaction.guild_id, interaction.channel)
        if refusal is not None:
            await tell(interaction, refusal)
        return refusal is None

    async def on_error(self, interaction: Interaction, error: app_commands.AppCommandError, /) -> None:
        if interaction.extras.get("error_handled"):  # a cog's handler already answered
            return
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        sentence = user_message(original)
        if sentence is None:
            command = interaction.command.qualified_name if interaction.command else "?"
            log.error("/%s failed for user %s", command, interaction.user.id, exc_info=original)
        await tell(interaction, sentence or SORRY)


class SDBot(commands.Bot):
    """Pass `model` to reuse an already loaded one (tests do); otherwise `setup_hook` loads `settings.model`."""

    def __init__(
        self,
        settings: Settings,
        *,
        model: sdengine.Model | None = None,
        progress_interval: float = 2.0,
        **options: Any,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,  # required by commands.Bot; no prefix commands exist
            help_command=None,
            intents=intents(),
            allowed_mentions=NO_PINGS,
            tree_cls=Tree,
            **options,
        )
        self.settings = settings
        self.progress_interval = progress_interval
        self._model = model
        self._store: Store | None = None
        self._executor: Executor | None = None
        self._generations: GenerationService | None = None
        self._closed = False

    # Set up by setup_hook; the cogs only run after it.
    @property
    def model(self) -> sdengine.Model:
        assert self._model is not None, "setup_hook has not loaded the model"
        return self._model

    @property
    def store(self) -> Store:
        assert self._store is not None, "setup_hook has not opened the store"
        return self._store

    @property
    def executor(self) -> Executor:
        assert self._executor is not None, "setup_hook has not started the executor"
        return self._executor

    @property
    def generations(self) -> GenerationService:
        assert self._generations is not None, "setup_hook has not started the generation service"
        return self._generations

    async def setup_hook(self) -> None:
        settings = self.settings
        self._store = await Store.open(settings.storage.database)
        stale = await self._store.fail_unfinished("The bot restarted before this request finished.")
        if stale:
            log.warning("marked %d generations from the last run as failed", len(stale))

        if self._model is None:
            model = settings.model
            log.info("loading model %r on %s (%s)", model.path, model.device, model.dtype)
            self._model = await asyncio.to_thread(
                sdengine.load_model, model.path, device=model.device, dtype=model.dtype
            )
        limits = settings.limits
        self._executor = Executor(
            self._model,
            ExecutorConfig(
                max_batch=limits.max_batch or None,
                max_pending_per_owner=limits.max_pending_per_user,
                max_queued=limits.max_queue,
                job_timeout=limits.job_timeout_seconds,
            ),
        )
        self._generations = GenerationService(
            settings, self._store, self._executor, self._model, progress_interval=self.progress_interval
        )
        self.add_dynamic_items(*BUTTONS)

        for extension in EXTENSIONS:
            try:
                await self.load_extension(extension)
            except Exception:
                log.exception("could not load %s; the bot runs without it", extension)
        await self._sync_commands()

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

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: replies to images are handled by the variations cog's listener."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            await self._executor.shutdown()  # fails what is queued or running, with a reason
        if self._generations is not None:
            await self._generations.wait_idle(timeout=10)
        if self._store is not None:
            await self._store.fail_unfinished("The bot shut down before this request finished.")
            await self._store.close()
        await super().close()
