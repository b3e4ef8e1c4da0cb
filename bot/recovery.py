"""What survives a crash, and how the next start deals with it.

After a crash or `kill -9` nothing is lost. A generation that was queued or running runs again from its row with its
stored parameters and seed, and shows its progress and result in a new message in its channel (the interaction's
token may be dead by then). One that was started `MAX_ATTEMPTS` times may be what crashes the bot, at whatever stage
(decoding its image, encoding its prompt, denoising): it is failed instead, with a message and a Reroll button. A
command, button press or reply that was acknowledged but crashed before its row was written is found in the
`received` table, and its user is asked to send it again.

`SDBot` (bot/app.py) notes each such command as it arrives (`receipt`), and at start-up runs the interrupted work
again on a `ResumedOutput` and tells the users of the rest (`tell_interrupted`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import discord
from discord import ui

from bot import render
from bot.buttons import rerun_view
from bot.output import DEFAULT_FILESIZE_LIMIT, Output
from bot.render import File
from bot.replies import NO_PINGS, Interaction
from bot.rows import Generation, Received
from bot.store import Store

log = logging.getLogger(__name__)

# A generation started this many times (each start after a crash counts) is given up rather than run again.
MAX_ATTEMPTS = 3
GIVEN_UP = f"The bot went down {MAX_ATTEMPTS} times while working on this request, so it was not run again."
# How the `received` notes name what was lost, for the message that asks to send it again.
RECEIVED_NAMES = {
    "Make variations": "“Make variations”",
    "reroll button": "🔄 Reroll",
    "vary button": "Vary",
    "reply": "reply",
}


def receipt(interaction: Interaction, command: str, prompt: str = "") -> Received:
    """The `received` note of an interaction that starts a generation."""
    return Received(
        interaction_id=interaction.id,
        user_id=interaction.user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id or 0,
        command=command,
        prompt=prompt[:200],
        received_at=time.time(),
    )


class ResumedOutput(Output):
    """Where a generation resumed after a crash shows itself: new messages in its channel, each starting with a
    line that says whose request it is (a mention that pings nobody: allowed_mentions is none)."""

    def __init__(self, channel: discord.abc.Messageable, row: Generation) -> None:
        super().__init__(
            channel, channel_id=row.channel_id, guild_id=row.guild_id, filesize_limit=DEFAULT_FILESIZE_LIMIT
        )
        self.header = f"-# <@{row.user_id}>'s request from <t:{int(row.created_at)}:R>, run again after a bot restart"

    async def show(
        self, content: str, files: Sequence[File] = (), view: discord.ui.View | None = None, *, final: bool = False
    ) -> discord.Message | None:
        if len(self.header) + 1 + len(content) <= render.MAX_CONTENT:  # a long result keeps its text instead
            content = f"{self.header}\n{content}"
        return await super().show(content, files, view, final=final)


async def tell_interrupted(
    client: discord.Client, store: Store, given_up: list[Generation], lost: list[Received]
) -> None:
    """Post, in their channels, what the last run could not finish and will not run again; each is marked in the
    store only once its user is told, so a crash in between tells them again rather than never."""
    for row in given_up:
        await _post(
            client,
            row.channel_id,
            row.guild_id,
            f"**#{row.id}** · <@{row.user_id}>: the bot went down {MAX_ATTEMPTS} times while working on this "
            "request, so it may be what brings it down and was not run again. 🔄 Reroll tries it with a new seed.",
            rerun_view(row.id),
        )
        await store.mark_failed(row.id, GIVEN_UP)
    for note in lost:
        what = RECEIVED_NAMES.get(note.command, f"/{note.command}")
        prompt = f" `{render.clip_escaped(render.one_line(note.prompt), 100)}`" if note.prompt else ""
        await _post(
            client,
            note.channel_id,
            note.guild_id,
            f"<@{note.user_id}>: your {what}{prompt} was lost when the bot restarted before it started: "
            "please send it again.",
        )
        await store.forget_received(note.interaction_id)


async def _post(
    client: discord.Client, channel_id: int, guild_id: int | None, content: str, view: ui.View | None = None
) -> None:
    channel = client.get_partial_messageable(channel_id, guild_id=guild_id)
    try:
        if view is None:
            await channel.send(content, allowed_mentions=NO_PINGS)
        else:
            await channel.send(content, view=view, allowed_mentions=NO_PINGS)
    except discord.HTTPException as exc:  # the channel is gone or the bot may no longer post there
        log.warning("could not post in channel %s: %s", channel_id, exc)
