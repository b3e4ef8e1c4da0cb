"""The buttons on progress and result messages.

They are `DynamicItem`s: their state is the generation id in the custom_id plus the row in SQLite, so a button keeps
working after a restart. A press is acknowledged here, first and at once, because Discord drops an interaction not
answered within 3 seconds; then it goes to the `on_result_button` listener of the results cog, which checks who may
press it and does the work (bot/cogs/results.py). That keeps this module free of the bot itself.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Self

import discord
from discord import ui

from bot.replies import Interaction

Button = ui.Button[ui.View]
Action = Literal["reroll", "vary", "upscale", "delete", "cancel"]
ImageAction = Literal["vary", "upscale"]
_IMAGE_ACTIONS: dict[str, tuple[int, str | None]] = {"vary": (0, None), "upscale": (1, "⏫")}  # row, emoji
EVENT = "result_button"  # dispatched as on_result_button(interaction, action, gen_id, index)


async def _pressed(interaction: Interaction, action: Action, gen_id: int, index: int = 0) -> None:
    if action in ("reroll", "vary", "upscale"):
        await interaction.response.defer(thinking=True)  # a new message: the new result
    else:
        await interaction.response.defer()  # an update of the pressed message
    interaction.client.dispatch(EVENT, interaction, action, gen_id, index)


class RerollButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):reroll"):
    """The same parameters with a new seed."""

    def __init__(self, gen_id: int) -> None:
        super().__init__(ui.Button(label="Reroll", emoji="🔄", custom_id=f"gen:{gen_id}:reroll", row=2))
        self.gen_id = gen_id

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]))

    async def callback(self, interaction: Interaction) -> None:
        await _pressed(interaction, "reroll", self.gen_id)


class ImageButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):(?P<action>vary|upscale):(?P<index>\d)"):
    """An action on image `index` of a result: its variations (Vary, on the first row), or the image again through
    the hires fix (Upscale, on the second). Either posts a new result."""

    def __init__(self, gen_id: int, action: ImageAction, index: int, *, label: str = "") -> None:
        row, emoji = _IMAGE_ACTIONS[action]
        super().__init__(ui.Button(label=label, emoji=emoji, custom_id=f"gen:{gen_id}:{action}:{index}", row=row))
        self.gen_id = gen_id
        self.action = action
        self.index = index

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        action: ImageAction = "vary" if match["action"] == "vary" else "upscale"
        return cls(int(match["id"]), action, int(match["index"]))

    async def callback(self, interaction: Interaction) -> None:
        await _pressed(interaction, self.action, self.gen_id, self.index)


class DeleteButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):delete"):
    """Deletes the result message; only those who may moderate the generation may."""

    def __init__(self, gen_id: int) -> None:
        super().__init__(ui.Button(emoji="🗑", custom_id=f"gen:{gen_id}:delete", row=2))
        self.gen_id = gen_id

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]))

    async def callback(self, interaction: Interaction) -> None:
        await _pressed(interaction, "delete", self.gen_id)


class CancelButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):cancel"):
    """Stops a queued or running generation; only those who may moderate it may."""

    def __init__(self, gen_id: int) -> None:
        super().__init__(
            ui.Button(label="Cancel", emoji="✖", style=discord.ButtonStyle.danger, custom_id=f"gen:{gen_id}:cancel")
        )
        self.gen_id = gen_id

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]))

    async def callback(self, interaction: Interaction) -> None:
        await _pressed(interaction, "cancel", self.gen_id)


BUTTONS = (RerollButton, ImageButton, DeleteButton, CancelButton)


def progress_view(gen_id: int) -> ui.View:
    view = ui.View(timeout=None)
    view.add_item(CancelButton(gen_id))
    return view


def result_view(gen_id: int, count: int, *, upscaled: bool = False) -> ui.View:
    """Vary per image (V1…V4 when there are several), then Upscale per image (U1…U4) unless the result is upscaled
    already, then Reroll and Delete: a row each."""
    view = ui.View(timeout=None)
    for index in range(count):
        view.add_item(ImageButton(gen_id, "vary", index, label="Vary" if count == 1 else f"V{index + 1}"))
    if not upscaled:
        for index in range(count):
            view.add_item(ImageButton(gen_id, "upscale", index, label="Upscale" if count == 1 else f"U{index + 1}"))
    view.add_item(RerollButton(gen_id))
    view.add_item(DeleteButton(gen_id))
    return view


def rerun_view(gen_id: int) -> ui.View:
    """A single Reroll button, for a generation given up after crashes."""
    view = ui.View(timeout=None)
    view.add_item(RerollButton(gen_id))
    return view
