"""/queue shows what the generator is doing; /cancel stops one of your requests."""

from __future__ import annotations

from discord import app_commands
from discord.ext import commands

from bot.app import SDBot
from bot.views import NO_PINGS, Interaction, UserError, is_admin, not_blocked


class Queue(commands.Cog):
    def __init__(self, bot: SDBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await not_blocked(interaction)

    @app_commands.command(description="Show the queue and where your requests are in it.")
    async def queue(self, interaction: Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        stats = self.bot.executor.stats()
        lines = [
            f"{stats.queued} waiting, {stats.running_jobs} running "
            f"(last step: {stats.batch_size} of up to {stats.max_batch} images at once, "
            f"{stats.steps_per_second:.1f} steps/s)."
        ]
        if stats.paused:
            lines.append("The generator is paused: nothing new starts until an admin resumes it.")
        running = self.bot.executor.running_jobs()
        owner = str(interaction.user.id)
        mine = [
            f"#{gen_id} running" if job in running else f"#{gen_id} at position {job.position}"
            for gen_id, job in sorted(self.bot.generations.jobs.items())
            if job.owner == owner
        ]
        lines.append("Yours: " + ", ".join(mine) + "." if mine else "You have nothing queued or running.")
        await interaction.followup.send("\n".join(lines), ephemeral=True, allowed_mentions=NO_PINGS)

    @app_commands.command(description="Cancel your queued or running request (your latest one by default).")
    @app_commands.describe(id="The generation id to cancel")
    async def cancel(self, interaction: Interaction, id: app_commands.Range[int, 1, 2**62] | None = None) -> None:
        await interaction.response.defer(ephemeral=True)
        jobs = self.bot.generations.jobs
        owner = str(interaction.user.id)
        if id is None:
            id = max((gen_id for gen_id, job in jobs.items() if job.owner == owner), default=None)
            if id is None:
                raise UserError("You have nothing queued or running.")
        job = jobs.get(id)
        if job is None:
            raise UserError(f"#{id} is not queued or running.")
        if job.owner != owner and not is_admin(interaction):
            raise UserError(f"#{id} is not yours: only its requester or an admin can cancel it.")
        self.bot.generations.cancel(id)
        await interaction.followup.send(f"Cancelling #{id}.", ephemeral=True, allowed_mentions=NO_PINGS)


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Queue(bot))
