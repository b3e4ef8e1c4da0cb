"""The buttons on results: Reroll, Vary, Upscale, Delete and Cancel.

bot/buttons.py acknowledges each press at once and hands it here as `on_result_button`. Only then are the checks
made (the allowlist and blocklist from memory, who may press it from bot/access.py) and the database read.
"""

from __future__ import annotations

import logging

import discord
from discord.ext import commands

import sdengine
from bot.access import Actor, Place, may_moderate, may_rerun
from bot.app import SDBot
from bot.buttons import Action
from bot.output import Output
from bot.recovery import receipt
from bot.replies import BLOCKED, SORRY, Interaction, UserError, tell, user_message
from bot.rows import Generation

log = logging.getLogger(__name__)

NOT_YOURS = "Only its requester or a moderator of this server can {what} this."


class Results(commands.Cog):
    def __init__(self, bot: SDBot) -> None:
        self.bot = bot

    @commands.Cog.listener()
    async def on_result_button(self, interaction: Interaction, action: Action, gen_id: int, index: int) -> None:
        """The press was acknowledged already (bot/buttons.py); errors end here as one sentence."""
        bot = self.bot
        refusal = bot.refusal(interaction.guild_id, interaction.channel)
        if refusal is None and bot.store.is_blocked(interaction.user.id):
            refusal = BLOCKED
        if refusal is not None:
            await tell(interaction, refusal)
            return
        actor = Actor.of(interaction, bot.settings.discord.owner_ids)
        noted = action in ("reroll", "vary", "upscale")
        try:
            if noted:  # starts a generation: leave a trace until its row exists, as slash commands do
                await bot.note_received(receipt(interaction, f"{action} button"))
            if action == "cancel":
                await self._cancel(interaction, actor, gen_id)
            elif action == "delete":
                await self._delete(interaction, actor, await self._row(gen_id))
            else:
                row = await self._row(gen_id)
                if not may_rerun(actor, Place.of(row)):
                    raise UserError(f"#{gen_id} was not posted here: only its requester can run it again elsewhere.")
                output, user = Output.for_interaction(interaction), interaction.user
                if action == "reroll":
                    await bot.generations.rerun(row, output, user, seed=sdengine.random_seed(row.count))
                elif action == "upscale":
                    await bot.generations.upscale(row, index, output, user)
                else:
                    await bot.generations.vary(row, index, output, user, interaction.message)
        except Exception as exc:
            sentence = user_message(exc)
            if sentence is None:
                log.exception("button %r failed", interaction.data)
            await tell(interaction, sentence or SORRY)
        finally:
            if noted:
                await bot.forget_received(interaction.id)

    async def _row(self, gen_id: int) -> Generation:
        row = await self.bot.store.get(gen_id)
        if row is None:
            raise UserError(f"There is no generation #{gen_id}.")
        return row

    async def _cancel(self, interaction: Interaction, actor: Actor, gen_id: int) -> None:
        live = self.bot.generations.live.get(gen_id)
        if live is None:
            raise UserError(f"#{gen_id} is no longer queued or running.")
        if not may_moderate(actor, live.made):
            raise UserError(NOT_YOURS.format(what="cancel"))
        live.job.cancel()  # the progress message itself turns into "cancelled"

    async def _delete(self, interaction: Interaction, actor: Actor, row: Generation) -> None:
        if not may_moderate(actor, Place.of(row)):
            raise UserError(NOT_YOURS.format(what="delete"))
        # After a deferred update, the "original response" is the message that holds the button.
        try:
            await interaction.delete_original_response()
        except discord.NotFound:  # a second click on a message that is already gone: nothing left to do
            log.info("result message of interaction %s was already deleted", interaction.id)


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Results(bot))
