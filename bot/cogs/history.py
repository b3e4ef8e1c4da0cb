"""/history lists your generations from SQLite; /reroll runs a stored one again."""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

import discord
from discord import app_commands, ui
from discord.ext import commands

from bot import render
from bot.access import Actor, Place, may_rerun
from bot.app import SDBot
from bot.output import Output
from bot.replies import NO_PINGS, SORRY, Interaction, UserError, tell, user_message
from sdengine.request import MAX_SEED

log = logging.getLogger(__name__)

PAGE_SIZE = 10


class HistoryView(ui.View):
    """Previous/next page buttons, for the user who ran /history only."""

    def __init__(self, cog: History, user_id: int, page: int, pages: int) -> None:
        super().__init__(timeout=300)
        self.cog = cog
        self.user_id = user_id
        self.page = page
        self.pages = pages
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.previous.disabled = self.page <= 1
        self.next.disabled = self.page >= self.pages

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        if interaction.user.id != self.user_id:
            await tell(interaction, "These buttons belong to whoever ran /history: run it yourself.")
            return False
        return True

    async def on_error(self, interaction: Interaction, error: Exception, item: ui.Item[Any], /) -> None:
        sentence = user_message(error)
        if sentence is None:
            log.exception("history page for user %s failed", self.user_id, exc_info=error)
        await tell(interaction, sentence or SORRY)

    async def turn(self, interaction: Interaction, page: int) -> None:
        await interaction.response.defer()
        content, self.pages = await self.cog.page(self.user_id, page)
        self.page = min(page, self.pages)
        self._update_buttons()
        await interaction.edit_original_response(content=content, view=self, allowed_mentions=NO_PINGS)

    @ui.button(label="Newer", emoji="◀")
    async def previous(self, interaction: Interaction, button: ui.Button[HistoryView]) -> None:
        await self.turn(interaction, self.page - 1)

    @ui.button(label="Older", emoji="▶")
    async def next(self, interaction: Interaction, button: ui.Button[HistoryView]) -> None:
        await self.turn(interaction, self.page + 1)


class History(commands.Cog):
    def __init__(self, bot: SDBot) -> None:
        self.bot = bot
        self.views: set[HistoryView] = set()

    async def cog_unload(self) -> None:
        for view in self.views:  # ends their timeout tasks with the bot
            view.stop()

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await self.bot.not_blocked(interaction)

    async def page(self, user_id: int, page: int) -> tuple[str, int]:
        """The text of one page of the user's history, and the number of pages."""
        store = self.bot.store
        total = await store.count_for_user(user_id)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        page = min(max(page, 1), pages)
        rows = await store.history(user_id, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        if not rows:
            return "You have no generations yet: try /imagine.", pages
        lines = [f"Your generations, newest first (page {page} of {pages}, {total} in all):"]
        for row in rows:
            when = discord.utils.format_dt(dt.datetime.fromtimestamp(row.created_at, dt.UTC), "R")
            lines.append(render.history_line(row.id, row.prompt, row.seed, row.status, when))
        return "\n".join(lines), pages

    @app_commands.command(description="List your generations, newest first.")
    @app_commands.describe(page="Which page (10 per page)")
    async def history(self, interaction: Interaction, page: app_commands.Range[int, 1, 100_000] = 1) -> None:
        await interaction.response.defer(ephemeral=True)
        content, pages = await self.page(interaction.user.id, page)
        view = HistoryView(self, interaction.user.id, min(page, pages), pages)
        self.views = {v for v in self.views if not v.is_finished()} | {view}
        await interaction.followup.send(content, view=view, ephemeral=True, allowed_mentions=NO_PINGS)

    @app_commands.command(description="Run a stored generation again: its own seed reproduces it exactly.")
    @app_commands.describe(id="The generation id (see /history)", seed="Use this seed instead of the stored one")
    async def reroll(
        self,
        interaction: Interaction,
        id: app_commands.Range[int, 1, 2**62],
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
    ) -> None:
        await interaction.response.defer()
        row = await self.bot.store.get(id)
        actor = Actor.of(interaction, self.bot.settings.discord.owner_ids)
        if row is None or not may_rerun(actor, Place.of(row)):  # the same answer: ids are no secret, rows are
            raise UserError(
                f"You have no generation #{id} here: /history lists yours, and others' can be rerun where they were "
                "posted."
            )
        await self.bot.generations.rerun(row, Output.for_interaction(interaction), interaction.user, seed=seed)


async def setup(bot: SDBot) -> None:
    await bot.add_cog(History(bot))
