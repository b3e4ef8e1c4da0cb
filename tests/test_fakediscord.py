"""The fake Discord works with the real discord.py client, over real sockets.

Each test starts a ``commands.Bot`` (default intents, so no MESSAGE_CONTENT) against a fresh
``FakeDiscord`` and fails if discord.py logged any error (a payload it could not parse, say).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator

import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands
from PIL import Image

from tests.fakediscord import FakeDiscord, FakeMessage, run_client

pytestmark = pytest.mark.asyncio


def png(color: str = "red", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


class Bot(commands.Bot):
    """Syncs its (global) app commands to the fake guild on startup, like a dev-mode bot would."""

    def __init__(self, guild_id: int) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,  # discord.py waits this long after the last GUILD_CREATE
        )
        self.guild = discord.Object(guild_id)

    async def setup_hook(self) -> None:
        self.tree.copy_global_to(guild=self.guild)
        await self.tree.sync(guild=self.guild)


@pytest_asyncio.fixture
async def fake(caplog: pytest.LogCaptureFixture) -> AsyncIterator[FakeDiscord]:
    caplog.set_level(logging.WARNING, logger="discord")
    async with FakeDiscord() as fake:
        yield fake
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leaked, leaked


@pytest.fixture
def bot(fake: FakeDiscord) -> Bot:
    return Bot(fake.guild.id)


async def test_connects_gets_ready_and_syncs(fake: FakeDiscord, bot: Bot) -> None:
    @bot.tree.command(description="Draw something")
    async def imagine(interaction: discord.Interaction, prompt: str, steps: int = 20) -> None: ...

    async with run_client(fake, bot):
        await fake.wait_commands_synced("imagine")
        assert bot.user is not None and bot.user.id == fake.bot_user.id
        guild = bot.get_guild(fake.guild.id)
        assert guild is not None and guild.me is not None
        nsfw = guild.get_channel(fake.nsfw_channel.id)
        assert isinstance(nsfw, discord.TextChannel) and nsfw.is_nsfw()
        assert fake.identify_count == 1 and fake.intents == discord.Intents.default().value
        assert not fake.message_content_intent

        (command,) = fake.commands[fake.guild.id]
        assert [(o["name"], o["type"], o.get("required", False)) for o in command["options"]] == [
            ("prompt", 3, True),
            ("steps", 4, False),
        ]
        sync = fake.find_requests("PUT", rf"/guilds/{fake.guild.id}/commands$")[0]
        assert sync.headers["Authorization"] == f"Bot {fake.token}"
        assert not [r for r in fake.requests if r.unhandled]


async def test_slash_command_defer_and_followup_with_file(fake: FakeDiscord, bot: Bot) -> None:
    seen: dict[str, object] = {}
    result = png("blue", 16)

    @bot.tree.command(description="Draw something")
    async def imagine(interaction: discord.Interaction, prompt: str, image: discord.Attachment) -> None:
        await interaction.response.defer()
        seen.update(prompt=prompt, image=await image.read(), content_type=image.content_type)
        await interaction.followup.send(f"done: {prompt}", file=discord.File(io.BytesIO(result), "out.png"))

    async with run_client(fake, bot):
        await fake.wait_commands_synced("imagine")
        inter = await fake.slash_command(
            "imagine", {"prompt": "a cat"}, attachments={"image": ("in.png", png(), "image/png")}
        )
        callback = await inter.wait_callback()
        assert callback.type == 5 and not callback.ephemeral
        assert callback.latency < 1.0

        message = await inter.wait_message(lambda m: m.attachments)
        assert message is inter.original  # the first followup replaces the "thinking..." message
        assert message.content == "done: a cat" and not message.loading
        assert message.attachments[0].filename == "out.png"
        assert message.file() == result
        assert seen == {"prompt": "a cat", "image": png(), "content_type": "image/png"}


async def test_button_press_reaches_the_view(fake: FakeDiscord, bot: Bot) -> None:
    presses: list[int] = []

    class Menu(discord.ui.View):
        @discord.ui.button(label="Again", custom_id="again")
        async def again(self, interaction: discord.Interaction, button: discord.ui.Button[Menu]) -> None:
            presses.append(interaction.user.id)
            self.stop()  # also ends the view's timeout task, which would outlive the test
            await interaction.response.edit_message(content="again!", view=None)

    @bot.tree.command(description="Show a menu")
    async def menu(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pick one", view=Menu())

    async with run_client(fake, bot):
        await fake.wait_commands_synced("menu")
        inter = await fake.slash_command("menu")
        message = await inter.wait_message()
        assert message.components[0]["components"][0]["custom_id"] == "again"

        press = await fake.message_component("again", message, user=fake.bob)
        assert (await press.wait_callback()).type == 7
        assert presses == [fake.bob.id]
        assert message.content == "again!" and message.components == [] and message.edits == 1


async def test_message_context_menu_gets_target_and_attachments(fake: FakeDiscord, bot: Bot) -> None:
    seen: list[tuple[int, str, bytes]] = []

    @app_commands.context_menu(name="Upscale")
    async def upscale(interaction: discord.Interaction, message: discord.Message) -> None:
        attachment = message.attachments[0]
        seen.append((message.id, attachment.filename, await attachment.read()))
        await interaction.response.send_message("upscaling", ephemeral=True)

    bot.tree.add_command(upscale)
    async with run_client(fake, bot):
        await fake.wait_commands_synced("Upscale")
        target = await fake.user_message("look", author=fake.bob, attachments=[("cat.png", png("green"))])
        inter = await fake.context_menu("Upscale", target, user=fake.carol)
        callback = await inter.wait_callback()
        assert callback.type == 4 and callback.ephemeral and callback.data["content"] == "upscaling"
        assert seen == [(target.id, "cat.png", png("green"))]


async def test_rate_limited_channel_message_is_retried(fake: FakeDiscord, bot: Bot) -> None:
    fault = fake.fail_next("POST", r"^/channels/\d+/messages$", 429, retry_after=0.05)
    async with run_client(fake, bot):
        channel = bot.get_channel(fake.channel.id)
        assert isinstance(channel, discord.TextChannel)
        sent = await channel.send("hello")

    assert fault.hits == 1
    posts = fake.find_requests("POST", r"^/channels/\d+/messages$")
    assert [r.status for r in posts] == [429, 200]
    assert posts[1].at - posts[0].at >= 0.05
    assert fake.messages[-1].id == sent.id and fake.messages[-1].content == "hello"


async def test_error_statuses_raise_discord_exceptions(fake: FakeDiscord, bot: Bot) -> None:
    async with run_client(fake, bot):
        channel = bot.get_channel(fake.channel.id)
        assert isinstance(channel, discord.TextChannel)
        fake.fail_next("GET", r"/messages/\d+$", 404)
        with pytest.raises(discord.NotFound) as not_found:
            await channel.fetch_message(123)
        assert not_found.value.code == 10008
        fake.fail_next("POST", r"/messages$", 403)
        with pytest.raises(discord.Forbidden):
            await channel.send("nope")


async def test_expired_token_and_late_callback(fake: FakeDiscord, bot: Bot) -> None:
    errors: list[discord.HTTPException] = []
    fake.interaction_deadline = 0.2

    @bot.tree.command(description="Slow")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.3)
        try:
            await interaction.response.send_message("too late")
        except discord.HTTPException as exc:
            errors.append(exc)

    @bot.tree.command(description="Fast")
    async def fast(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        fake.expire_token(interaction.token)
        try:
            await interaction.followup.send("gone")
        except discord.HTTPException as exc:
            errors.append(exc)

    async with run_client(fake, bot):
        await fake.wait_commands_synced("slow", "fast")
        late = await fake.slash_command("slow")
        await fake.wait_for(lambda: late.callbacks)
        assert late.callbacks[0].status == 404 and late.callback is None
        await fake.slash_command("fast")
        await fake.wait_for(lambda: len(errors) == 2)
    assert [(e.status, e.code) for e in errors] == [(404, 10062), (401, 50027)]


@pytest.mark.parametrize("close_code", [4000, None], ids=["close-4000", "tcp-abort"])
async def test_dropped_gateway_resumes_and_replays(fake: FakeDiscord, bot: Bot, close_code: int | None) -> None:
    got: asyncio.Queue[discord.Message] = asyncio.Queue()
    resumed = asyncio.Event()

    async def on_message(message: discord.Message) -> None:
        await got.put(message)

    async def on_resumed() -> None:
        resumed.set()

    bot.add_listener(on_message)
    bot.add_listener(on_resumed)

    @bot.tree.command(description="Ping")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    async with run_client(fake, bot):
        await fake.drop_gateway(close_code)
        # Dispatched while the client is away: must be replayed after RESUME.
        missed = await fake.user_message(f"{fake.bot_user.mention} still there?")
        await asyncio.wait_for(resumed.wait(), 5)
        assert (await asyncio.wait_for(got.get(), 5)).id == missed.id
        assert fake.resume_count == 1 and fake.identify_count == 1

        inter = await fake.slash_command("ping")
        assert (await inter.wait_message()).content == "pong"


async def test_reply_mentioning_the_bot_carries_reference_and_content(fake: FakeDiscord, bot: Bot) -> None:
    got: asyncio.Queue[discord.Message] = asyncio.Queue()

    async def on_message(message: discord.Message) -> None:
        if message.author != bot.user:
            await got.put(message)

    bot.add_listener(on_message)
    async with run_client(fake, bot):
        channel = bot.get_channel(fake.channel.id)
        assert isinstance(channel, discord.TextChannel)
        await channel.send("here is your art", file=discord.File(io.BytesIO(png()), "art.png"))
        art: FakeMessage = fake.messages[-1]
        assert art.author is fake.bot_user and art.file() == png()

        await fake.user_message("make it blue", author=fake.alice, reply_to=art)
        reply = await asyncio.wait_for(got.get(), 5)
        assert reply.content == "make it blue"  # replying pings the bot, so content is visible
        assert bot.user in reply.mentions
        assert reply.reference is not None and reply.reference.message_id == art.id
        resolved = reply.reference.resolved
        assert isinstance(resolved, discord.Message) and resolved.attachments[0].filename == "art.png"
        assert await resolved.attachments[0].read() == png()

        # Without MESSAGE_CONTENT, a plain message arrives blank.
        await fake.user_message("just chatting", author=fake.bob, attachments=[("x.png", png())])
        plain = await asyncio.wait_for(got.get(), 5)
        assert plain.content == "" and plain.attachments == []


async def test_original_response_edit_keeps_attachments_then_delete(fake: FakeDiscord, bot: Bot) -> None:
    @bot.tree.command(description="Draw")
    async def draw(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("1/2", file=discord.File(io.BytesIO(png("red")), "a.png"))
        first = (await interaction.original_response()).attachments[0]
        second = discord.File(io.BytesIO(png("blue")), "b.png")
        await interaction.edit_original_response(content="2/2", attachments=[first, second])

    @bot.tree.command(description="Oops")
    async def oops(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("bad", ephemeral=True)
        await interaction.delete_original_response()

    async with run_client(fake, bot):
        await fake.wait_commands_synced("draw", "oops")
        inter = await fake.slash_command("draw")
        message = await inter.wait_message(lambda m: m.content == "2/2")
        assert [(a.filename, a.data) for a in message.attachments] == [
            ("a.png", png("red")),
            ("b.png", png("blue")),
        ]
        assert fake.find_requests("GET", r"/messages/@original$")

        gone = await fake.slash_command("oops")
        deleted = await gone.wait_message(lambda m: m.deleted)
        assert deleted.ephemeral and deleted.flags & 64


async def test_command_visibility_follows_discord_rules(fake: FakeDiscord, bot: Bot) -> None:
    @bot.tree.command(description="Admins only")
    @app_commands.default_permissions(administrator=True)
    async def reload(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("reloaded")

    @bot.tree.command(description="Spicy", nsfw=True)
    async def spicy(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("ok")

    async with run_client(fake, bot):
        await fake.wait_commands_synced("reload", "spicy")
        with pytest.raises(PermissionError):
            await fake.slash_command("reload", user=fake.alice)
        with pytest.raises(PermissionError):
            await fake.slash_command("spicy", channel=fake.channel)
        assert (await (await fake.slash_command("reload", user=fake.admin)).wait_message()).content == "reloaded"
        nsfw = await fake.slash_command("spicy", channel=fake.nsfw_channel)
        assert (await nsfw.wait_message()).channel_id == fake.nsfw_channel.id


async def test_wrong_token_fails_login(fake: FakeDiscord, bot: Bot) -> None:
    with pytest.raises(discord.LoginFailure):
        await bot.start("not-the-token")
    await bot.close()
    assert fake.requests[-1].status == 401 and fake.identify_count == 0
