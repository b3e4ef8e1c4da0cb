"""/imagine: a picture from a prompt, or from an attached image and a prompt."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

import sdengine
from bot import render
from bot.app import SDBot
from bot.cogs.models import model_labels
from bot.output import Output
from bot.replies import Interaction, UserError, tell
from sdengine.request import HIRES_UPSCALERS, MAX_SEED, SCHEDULER_LABELS

SIZE_NAMES = {
    "square": "square (1:1)",
    "portrait": "portrait (2:3)",
    "landscape": "landscape (3:2)",
    "wide": "wide (16:9)",
}

HIRES_SCALES = (1.5, 2.0)  # A1111's usual choices; the engine takes any scale above 1 up to 4


class Imagine(commands.Cog):
    def __init__(self, bot: SDBot) -> None:
        self.bot = bot

    @app_commands.command(description="Draw a picture from a text prompt, or from an image and a prompt.")
    @app_commands.describe(
        prompt="What to draw",
        negative="What to keep out of the picture",
        seed="The seed: the same seed and settings give the same picture",
        steps="Denoising steps: more is slower and often finer",
        guidance="How closely to follow the prompt (7.5 is usual)",
        scheduler="The sampler",
        size="The shape of the picture",
        count="How many pictures",
        image="Start from this image instead of noise",
        strength="With an image: how far to move away from it (1 = ignore it)",
        model="The model to draw with (/models lists them)",
        lora="A LoRA adapter, as name or name:weight; the same as <lora:name:weight> in the prompt",
        hires="Hires fix: draw at the size asked, then again this much bigger from the upscaled picture",
        hires_strength="Hires fix: how far the bigger pass may move away from the upscaled picture (0.5 is usual)",
        hires_steps="Hires fix: the steps of the bigger pass (default: the same as steps)",
        hires_upscaler="Hires fix: how the picture is upscaled before the bigger pass",
    )
    @app_commands.choices(
        scheduler=[app_commands.Choice(name=label, value=key) for key, label in SCHEDULER_LABELS.items()],
        size=[app_commands.Choice(name=label, value=key) for key, label in SIZE_NAMES.items()],
        hires_upscaler=[app_commands.Choice(name=label, value=key) for key, label in HIRES_UPSCALERS.items()],
    )
    @app_commands.choices(hires=[app_commands.Choice(name=f"{scale:g}x", value=scale) for scale in HIRES_SCALES])
    async def imagine(
        self,
        interaction: Interaction,
        prompt: str,
        negative: str | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
        guidance: app_commands.Range[float, 0.0, 30.0] | None = None,
        scheduler: str | None = None,
        size: str | None = None,
        count: app_commands.Range[int, 1, 4] = 1,
        image: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.05, 1.0] | None = None,
        model: str | None = None,
        lora: str | None = None,
        hires: float | None = None,
        hires_strength: app_commands.Range[float, 0.05, 1.0] | None = None,
        hires_steps: app_commands.Range[int, 1, 150] | None = None,
        hires_upscaler: str | None = None,
    ) -> None:
        await interaction.response.defer()
        bot = self.bot
        defaults = bot.settings.defaults
        width = height = None
        problem = None
        try:
            model = bot.generations.requests.model_name(model)
        except UserError as exc:  # the list offers only the models there are, but anything can be typed
            problem, model = str(exc), None
        if size in render.ASPECTS:
            info = bot.models[model or bot.settings.model.label]  # each model's own native size and size steps
            max_side, _ = bot.generations.policy.size_limits(model)
            width, height = render.aspect_size(size, info.native_size, 8 * info.latent_factor, max_side)
        elif size is not None:  # Discord offers only the choices, but a stale or forged payload can carry anything
            problem = f"Unknown size {size[:40]!r}: use one of {', '.join(render.ASPECTS)}."
        if lora:  # stored and shown as A1111 writes it, so rerolls and the infotext carry it like a typed tag
            prompt = f"{prompt} <lora:{lora}>"
        request = sdengine.GenerationRequest(
            prompt,
            negative=defaults.negative if negative is None else negative,
            scheduler=scheduler or defaults.scheduler,
            steps=steps or defaults.steps,
            guidance=defaults.guidance if guidance is None else guidance,
            seed=sdengine.random_seed(count) if seed is None else seed,
            width=width,
            height=height,
            count=count,
            strength=strength or defaults.strength,
            model=model,
            hires_scale=hires,
            hires_strength=hires_strength or defaults.hires_strength,
            hires_steps=hires_steps,
            hires_upscaler=hires_upscaler or defaults.hires_upscaler,
        )
        await bot.generations.run(
            request,
            Output.for_interaction(interaction),
            kind="imagine",
            user=interaction.user,
            image=image,
            problem=problem,
        )

    @imagine.autocomplete("model")
    async def model_autocomplete(self, interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
        typed = current.casefold()
        return [
            app_commands.Choice(name=label[:100], value=name)
            for name, label in model_labels(self.bot)
            if typed in name.casefold()
        ][:25]

    @imagine.autocomplete("lora")
    async def lora_autocomplete(self, interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
        """The adapters of the model picked so far (the default until one is), filtered by what is typed."""
        info = self.bot.models.get(getattr(interaction.namespace, "model", None) or self.bot.settings.model.label)
        typed = current.split(":")[0].strip().casefold()
        names = info.loras if info is not None else ()
        return [app_commands.Choice(name=name[:100], value=name[:100]) for name in names if typed in name.casefold()][
            :25
        ]

    async def cog_app_command_error(self, interaction: Interaction, error: app_commands.AppCommandError) -> None:
        # Discord enforces choices and ranges, but a client with a stale copy of the command can still send
        # values this version refuses.
        if isinstance(error, app_commands.TransformerError):
            interaction.extras["error_handled"] = True
            await tell(interaction, "One of the options is not valid any more: run /imagine again.")


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Imagine(bot))
