"""Buttons on progress and result messages, and how the bot answers an interaction in one plain sentence.

The buttons are `DynamicItem`s: their state is the generation id in the custom_id plus the row in SQLite, so a
button keeps working after a restart. Their work lives in the generation service; here they only check who may
press and turn errors into a sentence (discord.py only logs exceptions raised in a dynamic item's callback).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Self, cast

import discord
from discord import ui

import sdengine

if TYPE_CHECKING:
    from bot.app import SDBot

log = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
SORRY = "Something went wrong on my side: please try again in a minute."
BLOCKED = "You are blocked from using this bot: ask a server admin if you think this is a mistake."
MAX_SEED = 2**32 - 1

Interaction = discord.Interaction[Any]  # the client is always an SDBot; `sdbot()` gives it its type
Button = ui.Button[ui.View]


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


class UserError(Exception):
    """A request the user can fix; the message is one plain sentence for them."""


def sdbot(interaction: Interaction) -> SDBot:
    return cast("SDBot", interaction.client)


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
    except discord.HTTPException as exc:
        log.warning("could not tell user %s %r: %s", interaction.user.id, sentence, exc)


def user_message(error: BaseException) -> str | None:
    """The sentence to show for an error the user caused, or None for a bug."""
    if isinstance(error, UserError | sdengine.SDEngineError):
        return str(error)
    return None


def is_admin(interaction: Interaction) -> bool:
    """Server admins (Administrator or Manage Messages here) and the configured bot owners."""
    if interaction.user.id in sdbot(interaction).settings.discord.owner_ids:
        return True
    permissions = interaction.permissions
    return interaction.guild_id is not None and (permissions.administrator or permissions.manage_messages)


async def allowed_here(interaction: Interaction) -> bool:
    """The channel allowlist and the blocklist, for buttons (app commands get the allowlist from the tree's check)."""
    bot = sdbot(interaction)
    refusal = bot.refusal(interaction.guild_id, interaction.channel)
    if refusal is None and await bot.store.is_blocked(interaction.user.id):
        refusal = BLOCKED
    if refusal is not None:
        await tell(interaction, refusal)
    return refusal is None


async def not_blocked(interaction: Interaction) -> bool:
    """A cog's `interaction_check`: blocked users get one sentence instead of the command."""
    if not await sdbot(interaction).store.is_blocked(interaction.user.id):
        return True
    interaction.extras["error_handled"] = True  # answered here: the tree's on_error stays quiet on the CheckFailure
    await tell(interaction, BLOCKED)
    return False


async def requester_or_admin(interaction: Interaction, gen_id: int, what: str) -> bool:
    if not await allowed_here(interaction):
        return False
    row = await sdbot(interaction).store.get(gen_id)
    if (row is not None and row.user_id == interaction.user.id) or is_admin(interaction):
        return True
    await tell(interaction, f"Only the requester can {what} this.")
    return False


async def guarded(interaction: Interaction, work: Awaitable[None]) -> None:
    """The buttons' error handler: a user error becomes its sentence, anything else is logged and apologised for."""
    try:
        await work
    except Exception as exc:
        sentence = user_message(exc)
        if sentence is None:
            log.exception("button %r failed", interaction.data)
        await tell(interaction, sentence or SORRY)


class RerollButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):reroll"):
    """The same parameters with a new seed."""

    def __init__(self, gen_id: int) -> None:
        super().__init__(ui.Button(label="Reroll", emoji="🔄", custom_id=f"gen:{gen_id}:reroll", row=1))
        self.gen_id = gen_id

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]))

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await allowed_here(interaction)

    async def callback(self, interaction: Interaction) -> None:
        await interaction.response.defer(thinking=True)
        generations = sdbot(interaction).generations
        await guarded(interaction, generations.rerun(interaction, self.gen_id, seed=random_seed()))


class VaryButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):vary:(?P<index>\d)"):
    """Image-to-image variations of image `index` of a result."""

    def __init__(self, gen_id: int, index: int, *, label: str = "Vary") -> None:
        super().__init__(ui.Button(label=label, custom_id=f"gen:{gen_id}:vary:{index}", row=0))
        self.gen_id = gen_id
        self.index = index

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]), int(match["index"]))

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await allowed_here(interaction)

    async def callback(self, interaction: Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await guarded(interaction, sdbot(interaction).generations.vary(interaction, self.gen_id, self.index))


class DeleteButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):delete"):
    """Deletes the result message; only its requester or an admin may."""

    def __init__(self, gen_id: int) -> None:
        super().__init__(ui.Button(emoji="🗑", custom_id=f"gen:{gen_id}:delete", row=1))
        self.gen_id = gen_id

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]))

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await requester_or_admin(interaction, self.gen_id, "delete")

    async def callback(self, interaction: Interaction) -> None:
        await interaction.response.defer()
        await guarded(interaction, self._delete(interaction))

    @staticmethod
    async def _delete(interaction: Interaction) -> None:
        # After a deferred update, the "original response" is the message that holds the button.
        try:
            await interaction.delete_original_response()
        except discord.NotFound:  # a second click on a message that is already gone: nothing left to do
            log.info("result message of interaction %s was already deleted", interaction.id)


class CancelButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):cancel"):
    """Stops a queued or running generation; only its requester or an admin may."""

    def __init__(self, gen_id: int) -> None:
        super().__init__(
            ui.Button(label="Cancel", emoji="✖", style=discord.ButtonStyle.danger, custom_id=f"gen:{gen_id}:cancel")
        )
        self.gen_id = gen_id

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]))

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await requester_or_admin(interaction, self.gen_id, "cancel")

    async def callback(self, interaction: Interaction) -> None:
        if not sdbot(interaction).generations.cancel(self.gen_id):
            await tell(interaction, f"#{self.gen_id} is no longer queued or running.")
            return
        await interaction.response.defer()  # the progress message itself turns into "cancelled"


BUTTONS = (RerollButton, VaryButton, DeleteButton, CancelButton)


def progress_view(gen_id: int) -> ui.View:
    view = ui.View(timeout=None)
    view.add_item(CancelButton(gen_id))
    return view


def result_view(gen_id: int, count: int) -> ui.View:
    """Vary per image (V1…V4 when there are several), then Reroll and Delete."""
    view = ui.View(timeout=None)
    if count == 1:
        view.add_item(VaryButton(gen_id, 0))
    else:
        for index in range(count):
            view.add_item(VaryButton(gen_id, index, label=f"V{index + 1}"))
    view.add_item(RerollButton(gen_id))
    view.add_item(DeleteButton(gen_id))
    return view
