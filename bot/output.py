"""Where one generation shows its progress and its result: the transport to Discord, and its failure modes.

For an interaction, that is its response while the 15-minute token lives, then a message in the channel. For a
message (a reply to an image), it is a reply to that message, edited as the generation goes.

Progress is best effort: the first edit that fails, for any reason, stops the progress edits. A result is tried
again, then posted in the channel instead, and `show(final=True)` returns None only when nothing went out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
from collections.abc import Sequence
from typing import Any

import discord

from bot.render import File
from bot.replies import NO_PINGS, TRANSPORT_ERRORS, Interaction, plain, tell

log = logging.getLogger(__name__)

TOKEN_LIFETIME = dt.timedelta(minutes=14)  # Discord's is 15; keep a margin for a slow upload
DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
RESULT_RETRY_DELAY = 1.0  # seconds before a result that failed to post is tried again


def _file(name: str, data: bytes) -> discord.File:
    return discord.File(io.BytesIO(data), filename=name)


def _token_gone(error: discord.HTTPException) -> bool:
    """401 / 50027 Invalid Webhook Token, or 10015 Unknown Webhook: the interaction can no longer post."""
    return error.status == 401 or error.code in (50027, 10015)


class Output:
    """Where one generation shows its progress and its result, and tells the user what went wrong."""

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
        self._progress_broken = False  # an edit failed (message deleted, no permission, network): stop progress

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
    def source_id(self) -> int | None:
        """The interaction or message that asked for this generation."""
        if self.interaction is not None:
            return self.interaction.id
        return self._reply_to.id if self._reply_to is not None else None

    @property
    def age_restricted(self) -> bool:
        """Whether the channel is marked age-restricted (NSFW) in Discord; a thread follows its parent."""
        is_nsfw = getattr(self._channel, "is_nsfw", None)
        return callable(is_nsfw) and bool(is_nsfw())

    async def show(
        self, content: str, files: Sequence[File] = (), view: discord.ui.View | None = None, *, final: bool = False
    ) -> discord.Message | None:
        """Put `content`, `files` and `view` on the message. Progress (`final=False`) is best effort: after an
        error it stops. A final message is tried twice where it was going, then twice as a new channel message;
        None means it never went out."""
        if not final:
            if self._progress_broken:
                return None
            try:
                return await self._put(content, files, view)
            except TRANSPORT_ERRORS as exc:
                log.warning("could not update the message in channel %s: %s", self.channel_id, _describe(exc))
                self._progress_broken = True
                return None
        for attempt in range(4):
            if attempt == 2:  # the response or our message cannot take it: a new message in the channel
                self._token_dead, self.message = True, None
            elif attempt:
                await asyncio.sleep(RESULT_RETRY_DELAY)
            try:
                return await self._put(content, files, view)
            except TRANSPORT_ERRORS as exc:
                log.warning(
                    "could not post the result in channel %s (try %d of 4): %s",
                    self.channel_id,
                    attempt + 1,
                    _describe(exc),
                )
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


def _describe(error: BaseException) -> str:
    """An error in one line for the log; a timeout has no message of its own."""
    return str(error) or type(error).__name__
