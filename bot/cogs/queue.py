"""/queue shows what the generator is doing; /cancel stops one of your requests."""

from __future__ import annotations

from discord import app_commands
from discord.ext import commands

from bot.access import Actor, may_moderate
from bot.app import SDBot
from bot.replies import NO_PINGS, Interaction, UserError


class Queue(commands.Cog):
    def __init__(self, bot: SDBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await self.bot.not_blocked(interaction)

    @app_commands.command(description="Show the queue and where your requests are in it.")
    async def queue(self, interaction: Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        stats = self.bot.executor.stats()
        lines = [
            f"{stats.queued} waiting, {stats.running_jobs} running "
            f"(last step: {stats.batch_size} of up to {stats.max_batch} images at once, "
            f"{stats.steps_per_second:.1f} steps/s)."
        ]
        if stats.down:
            lines.append(f"The generator is down: {stats.down_reason}")
        if stats.paused:
            lines.append("The generator is paused: nothing new starts until an admin resumes it.")
        running = self.bot.executor.running_jobs()
        owner = str(interaction.user.id)
        mine = [
            f"#{gen_id} running" if live.job in running else f"#{gen_id} at position {live.job.position}"
            for gen_id, live in sorted(self.bot.generations.live.items())
            if live.job.owner == owner
        ]
        lines.append("Yours: " + ", ".join(mine) + "." if mine else "You have nothing queued or running.")
        await interaction.followup.send("\n".join(lines), ephemeral=True, allowed_mentions=NO_PINGS)

    @app_commands.command(description="Cancel your queued or running request (your latest one by default).")
    @app_commands.describe(id="The generation id to cancel")
    async def cancel(self, interaction: Interaction, id: app_commands.Range[int, 1, 2**62] | None = None) -> None:
        await interaction.response.defer(ephemeral=True)
        live_jobs = self.bot.generations.live
        if id is None:
            mine = [gen_id for gen_id, live in live_jobs.items() if live.made.user_id == interaction.user.id]
            id = max(mine, default=None)
            if id is None:
                raise UserError("You have nothing queued or running.")
        live = live_jobs.get(id)
        if live is None:
            raise UserError(f"#{id} is not queued or running.")
        if not may_moderate(Actor.of(interaction, self.bot.settings.discord.owner_ids), live.made):
            raise UserError(f"#{id} is not yours: only its requester or a moderator of its server can cancel it.")
        live.job.cancel()
        await interaction.followup.send(f"Cancelling #{id}.", ephemeral=True, allowed_mentions=NO_PINGS)


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Queue(bot))
