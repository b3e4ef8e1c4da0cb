"""How the bot answers a user in one plain sentence, whatever went wrong and however far the interaction got.

A leaf module: it knows discord.py and the engine's error types, and nothing else of the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from typing import Any

import aiohttp
import discord

import sdengine

log = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
SORRY = "Something went wrong on my side: please try again in a minute."
BLOCKED = "You are blocked from using this bot: ask a server admin if you think this is a mistake."

Interaction = discord.Interaction[Any]  # the client is always an SDBot
# What a request to Discord can raise once discord.py has used up its own retries: an HTTP error, a connection
# reset or refused, a timeout, or a client-side refusal (no channel, a closed session).
TRANSPORT_ERRORS = (discord.HTTPException, discord.ClientException, aiohttp.ClientError, asyncio.TimeoutError, OSError)


class UserError(Exception):
    """A request the user can fix; the message is one plain sentence for them."""


def plain(sentence: str) -> str:
    """A sentence for the user, safe to send: mentions it quotes from user input are escaped (allowed_mentions is
    the backstop), and it is clipped to the 2000 characters a message can hold, so it always arrives."""
    sentence = discord.utils.escape_mentions(sentence)
    return sentence if len(sentence) <= 2000 else sentence[:1999] + "…"


async def tell(interaction: Interaction, sentence: str) -> None:
    """Answer with one ephemeral sentence, however far the interaction has got."""
    sentence = plain(sentence)
    try:
        if not interaction.response.is_done():
            await interaction.response.send_message(sentence, ephemeral=True, allowed_mentions=NO_PINGS)
            return
        if interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
            # The first followup would fill the "thinking…" placeholder, which may be public: remove it first.
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
        await interaction.followup.send(sentence, ephemeral=True, allowed_mentions=NO_PINGS)
    except TRANSPORT_ERRORS as exc:
        log.warning("could not tell user %s %r: %s", interaction.user.id, sentence, str(exc) or type(exc).__name__)


def database_trouble(error: sqlite3.Error) -> str:
    """The sentence for a user whose request the database refused: busy (another program holds its lock longer
    than the busy_timeout), or not writable (the disk is full, or an I/O error)."""
    if getattr(error, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "My database is busy, so I could not take your request: try again in a minute."
    return "My database cannot be written to right now (the disk may be full), so I could not take your request."


def user_message(error: BaseException) -> str | None:
    """The sentence to show for an error the user caused or can wait out, or None for a bug."""
    if isinstance(error, UserError | sdengine.SDEngineError):
        return str(error)
    if isinstance(error, sqlite3.OperationalError):  # locked past the busy_timeout, or the disk is full
        return database_trouble(error)
    return None
