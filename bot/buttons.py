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


class VaryButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):vary:(?P<index>\d)"):
    """Image-to-image variations of image `index` of a result."""

    def __init__(self, gen_id: int, index: int, *, label: str = "Vary") -> None:
        super().__init__(ui.Button(label=label, custom_id=f"gen:{gen_id}:vary:{index}", row=0))
        self.gen_id = gen_id
        self.index = index

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]), int(match["index"]))

    async def callback(self, interaction: Interaction) -> None:
        await _pressed(interaction, "vary", self.gen_id, self.index)


class UpscaleButton(ui.DynamicItem[Button], template=r"gen:(?P<id>\d+):upscale:(?P<index>\d)"):
    """Image `index` of a result through the hires fix, posted as a new result."""

    def __init__(self, gen_id: int, index: int, *, label: str = "Upscale") -> None:
        super().__init__(ui.Button(label=label, emoji="⏫", custom_id=f"gen:{gen_id}:upscale:{index}", row=1))
        self.gen_id = gen_id
        self.index = index

    @classmethod
    async def from_custom_id(cls, interaction: Interaction, item: ui.Item[Any], match: re.Match[str], /) -> Self:
        return cls(int(match["id"]), int(match["index"]))

    async def callback(self, interaction: Interaction) -> None:
        await _pressed(interaction, "upscale", self.gen_id, self.index)


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


BUTTONS = (RerollButton, VaryButton, UpscaleButton, DeleteButton, CancelButton)


def progress_view(gen_id: int) -> ui.View:
    view = ui.View(timeout=None)
    view.add_item(CancelButton(gen_id))
    return view


def result_view(gen_id: int, count: int, *, upscaled: bool = False) -> ui.View:
    """Vary per image (V1…V4 when there are several), then Upscale per image (U1…U4) unless the result is upscaled
    already, then Reroll and Delete: a row each."""
    view = ui.View(timeout=None)
    if count == 1:
        view.add_item(VaryButton(gen_id, 0))
    else:
        for index in range(count):
            view.add_item(VaryButton(gen_id, index, label=f"V{index + 1}"))
    if not upscaled:
        for index in range(count):
            view.add_item(UpscaleButton(gen_id, index, label="Upscale" if count == 1 else f"U{index + 1}"))
    view.add_item(RerollButton(gen_id))
    view.add_item(DeleteButton(gen_id))
    return view


def rerun_view(gen_id: int) -> ui.View:
    """A single Reroll button, for a generation given up after crashes."""
    view = ui.View(timeout=None)
    view.add_item(RerollButton(gen_id))
    return view
