"""Variations of any image: reply to it mentioning the bot, or pick "Make variations" on it.

A reply's text (minus the mention) is the new prompt. Without text, the prompt is the one stored for the bot's own
result, else the one embedded in the PNG; with neither, the user is asked for one.

No privileged intent is needed for replies to the bot's own results: Discord shows the bot the content of messages
that mention it or are its own. Other people's messages that do not mention it arrive blanked, attachments too,
unless the owner turned on the privileged Message Content intent (`[discord] message_content`); a reply to one of
those gets one sentence pointing to the "Make variations" menu, which always works.
"""

from __future__ import annotations

import logging
import re

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import SDBot
from bot.download import ImageSource, embed_url
from bot.output import Output
from bot.replies import SORRY, Interaction, UserError
from bot.rows import Generation, Received

log = logging.getLogger(__name__)

BUTTON_ID = re.compile(r"gen:(\d+):")
HIDDEN = (
    "I cannot see the images in other people's messages here: use “Make variations” in that message's Apps menu "
    "(right-click it, or press and hold), which always works."
)


def image_in(message: discord.Message) -> ImageSource | None:
    """The image to vary: the first image attachment (a result's single image over its grid), else an embed's."""
    images = [a for a in message.attachments if (a.content_type or "").startswith("image/") or a.width]
    singles = [a for a in images if not a.filename.endswith("-grid.png")]
    if singles or images:
        return (singles or images)[0]
    return next((embed for embed in message.embeds if embed_url(embed)), None)


def generation_id(message: discord.Message) -> int | None:
    """The generation shown by one of the bot's result messages, read from its buttons' custom ids."""
    for row in message.components:
        for item in getattr(row, "children", ()):
            match = BUTTON_ID.match(getattr(item, "custom_id", None) or "")
            if match:
                return int(match[1])
    return None


class Variations(commands.Cog):
    def __init__(self, bot: SDBot) -> None:
        self.bot = bot
        # Context menus cannot live inside a cog class: build it here and remove it on unload.
        self.menu = app_commands.ContextMenu(name="Make variations", callback=self.make_variations)
        bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    async def source_of(self, message: discord.Message) -> Generation | None:
        """The stored generation behind one of the bot's own results, if `message` is one."""
        if self.bot.user is None or message.author.id != self.bot.user.id:
            return None
        gen_id = generation_id(message)
        return await self.bot.store.get(gen_id) if gen_id is not None else None

    async def vary(self, target: discord.Message, prompt: str, output: Output, user: discord.abc.User) -> None:
        image = image_in(target)
        if image is None:
            await output.reject("That message has no image to make variations of.")
            return
        source = await self.source_of(target)
        request = self.bot.generations.requests.variation_request(prompt or (source.prompt if source else ""), source)
        await self.bot.generations.run(
            request,
            output,
            kind="variation",
            user=user,
            image=image,
            parent_id=source.id if source else None,
        )

    async def make_variations(self, interaction: Interaction, message: discord.Message) -> None:
        await interaction.response.defer()
        await self.vary(message, "", Output.for_interaction(interaction), interaction.user)

    def hidden_from_me(self, message: discord.Message) -> bool:
        """Whether Discord blanked `message` for the bot: someone else's guild message that does not mention it,
        without the Message Content intent."""
        me = self.bot.user
        return not (
            self.bot.settings.discord.message_content
            or message.guild is None
            or (me is not None and (message.author.id == me.id or me in message.mentions))
        )

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if message.author.bot or me is None or me not in message.mentions or message.reference is None:
            return
        if self.bot.refusal(message.guild.id if message.guild else None, message.channel) is not None:
            return  # not our channel: stay quiet rather than answer every mention
        output = Output.for_message(message)
        try:
            target = message.reference.resolved
            if not isinstance(target, discord.Message):
                if message.reference.message_id is None:
                    return
                target = await message.channel.fetch_message(message.reference.message_id)
            if image_in(target) is None:
                if self.hidden_from_me(target):
                    await output.reject(HIDDEN)
                return  # a reply to a message without an image is just talk
            prompt = re.sub(rf"<@!?{me.id}>", "", message.content).strip()
            log.info("reply by user %s to message %s: %r", message.author.id, target.id, prompt)
            await self.bot.note_received(
                Received(
                    message.id,
                    message.author.id,
                    output.guild_id,
                    output.channel_id,
                    "reply",
                    prompt[:200],
                    message.created_at.timestamp(),
                )
            )
            try:
                await self.vary(target, prompt, output, message.author)
            finally:
                await self.bot.forget_received(message.id)
        except discord.NotFound:
            return  # the replied-to message is gone
        except Exception as exc:
            if not isinstance(exc, UserError):
                log.exception("variation reply to message %s failed", message.id)
            await output.reject(str(exc) if isinstance(exc, UserError) else SORRY)


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Variations(bot))
