"""/models: the models this bot has, with their kind, native size and whether each is on the GPU now."""

from __future__ import annotations

from discord import app_commands
from discord.ext import commands

from bot import render
from bot.app import SDBot
from bot.replies import NO_PINGS, Interaction


class Models(commands.Cog):
    def __init__(self, bot: SDBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await self.bot.not_blocked(interaction)

    @app_commands.command(description="List the models you can pick with /imagine's model option.")
    async def models(self, interaction: Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        lines = [f"- {label}" for _, label in model_labels(self.bot)]
        await interaction.followup.send("\n".join(lines), ephemeral=True, allowed_mentions=NO_PINGS)


def model_labels(bot: SDBot) -> list[tuple[str, str]]:
    """(name, label) of every model, the default first: /models and /imagine's model list show these."""
    loaded = set(bot.executor.stats().loaded)
    ray = bot.settings.executor.backend == "ray"  # each worker keeps its one model loaded
    default = bot.settings.model.label
    return [
        (name, render.model_label(name, info, default=name == default, loaded=ray or name in loaded))
        for name, info in sorted(bot.models.items(), key=lambda item: item[0] != default)
    ]


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Models(bot))
