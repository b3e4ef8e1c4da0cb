"""``FakeDiscord``: world state, Discord payload rendering, and the test-facing API."""

from __future__ import annotations

import asyncio
import contextlib
import io
import mimetypes
import re
import secrets
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import discord
import yarl
from aiohttp import web

from ._gateway import INVALID_SESSION, RECONNECT, Gateway
from ._models import (
    ADMINISTRATOR,
    DEFAULT_PERMISSIONS,
    EPHEMERAL,
    INTENT_DIRECT_MESSAGES,
    INTENT_GUILD_MESSAGES,
    INTENT_MESSAGE_CONTENT,
    JSON,
    LOADING,
    CallbackRecord,
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeRole,
    FakeUser,
    RequestRecord,
    UploadedFile,
    iso,
    now,
    snowflake,
)
from ._rest import ApiError, Fault, RestApi, form_error, unknown_message

T = TypeVar("T")

# Application flags: GATEWAY_MESSAGE_CONTENT_LIMITED | APPLICATION_COMMAND_BADGE, like a small unverified bot.
APP_FLAGS = (1 << 19) | (1 << 23)
MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_FILES = 10

# Message types: DEFAULT, REPLY, CHAT_INPUT_COMMAND, CONTEXT_MENU_COMMAND.
MSG_DEFAULT, MSG_REPLY, MSG_CHAT_INPUT, MSG_CONTEXT_MENU = 0, 19, 20, 23

# Application command option types.
OPT_SUBCOMMAND, OPT_GROUP, OPT_STRING, OPT_INTEGER, OPT_BOOLEAN = 1, 2, 3, 4, 5
OPT_USER, OPT_CHANNEL, OPT_ROLE, OPT_NUMBER, OPT_ATTACHMENT = 6, 7, 8, 10, 11

AttachmentSpec = FakeAttachment | tuple[str, bytes] | tuple[str, bytes, str]


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    """Discord reports width/height for images; sniff them with Pillow when it can."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height
    except Exception:
        return None, None


class FakeDiscord:
    """A local Discord (REST + gateway on 127.0.0.1) for the real discord.py client.

    Default world (when ``guilds`` is None): guild ``fake.guild`` with text channel ``fake.channel``
    and NSFW text channel ``fake.nsfw_channel``; users ``fake.alice``, ``fake.bob``, ``fake.carol``
    and ``fake.admin`` (guild owner, holds an Administrator role, and owns the application);
    the bot user ``fake.bot_user`` (always added to every guild with a managed role).

    ``interaction_deadline``: an initial callback arriving later than this (seconds since dispatch)
    gets Discord's 404 "Unknown interaction", like the real 3 s limit. ``None`` disables it.
    ``upload_limit``: per-message upload cap (413 above it), also sent as ``attachment_size_limit``.
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        app_id: int | None = None,
        bot_name: str = "sdbot",
        guilds: list[FakeGuild] | None = None,
        heartbeat_interval: int = 41250,
        interaction_deadline: float | None = 3.0,
        upload_limit: int = 10 * 1024 * 1024,
    ) -> None:
        self.token = token
        self.bot_user = FakeUser(bot_name, bot=True)
        self.app_id = app_id if app_id is not None else self.bot_user.id
        self.alice, self.bob, self.carol = FakeUser("alice"), FakeUser("bob"), FakeUser("carol")
        self.admin = FakeUser("admin")
        self.interaction_deadline = interaction_deadline
        self.upload_limit = upload_limit
        self.guilds = guilds if guilds is not None else [self._default_guild()]
        for guild in self.guilds:
            if guild.member(self.bot_user) is None:
                role = FakeRole(bot_name, permissions=DEFAULT_PERMISSIONS, bot_id=self.bot_user.id, position=1)
                guild.roles.append(role)
                guild.add_member(self.bot_user, role)

        self.users: dict[int, FakeUser] = {
            u.id: u for u in (self.bot_user, self.alice, self.bob, self.carol, self.admin)
        }
        self.users.update({m.user.id: m.user for g in self.guilds for m in g.members})
        self.channels: dict[int, FakeChannel] = {c.id: c for g in self.guilds for c in g.channels}

        self.messages: list[FakeMessage] = []
        self.interactions: list[FakeInteraction] = []
        self.attachments: dict[int, FakeAttachment] = {}
        self.commands: dict[int | None, list[JSON]] = {}  # guild id (None = global) -> synced commands
        self.command_syncs = 0
        self._interactions_by_token: dict[str, FakeInteraction] = {}

        self.gateway = Gateway(self, heartbeat_interval)
        self.rest = RestApi(self)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._saved_urls: tuple[str, yarl.URL] | None = None
        self._ready = asyncio.Event()
        self._change = asyncio.Event()

    def _default_guild(self) -> FakeGuild:
        guild = FakeGuild.create(
            "Fake Guild",
            self.admin,
            channels=[FakeChannel("general"), FakeChannel("nsfw-art", nsfw=True)],
        )
        admin_role = FakeRole("Admin", permissions=ADMINISTRATOR | DEFAULT_PERMISSIONS, position=2)
        guild.roles.append(admin_role)
        for user in (self.alice, self.bob, self.carol):
            guild.add_member(user)
        guild.add_member(self.admin, admin_role)
        return guild

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve on a free port and point discord.py at it (``Route.BASE``, ``DEFAULT_GATEWAY``)."""
        app = web.Application(middlewares=[self.rest.middleware], client_max_size=4 * self.upload_limit)
        app.router.add_get("/", self.gateway.handle)
        self.rest.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._saved_urls = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = f"{self.base_url}/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)

    async def stop(self) -> None:
        """Close sockets, stop serving and restore discord.py's URLs. Close the client first:
        a still-running client would try to reconnect."""
        if self._saved_urls is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved_urls
            self._saved_urls = None
        await self.gateway.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    # -- convenience views --------------------------------------------------------------------------

    @property
    def guild(self) -> FakeGuild:
        return self.guilds[0]

    @property
    def channel(self) -> FakeChannel:
        """First non-NSFW text channel of the first guild."""
        return next(c for c in self.guild.channels if c.type == 0 and not c.nsfw)

    @property
    def nsfw_channel(self) -> FakeChannel:
        return next(c for c in self.guild.channels if c.nsfw)

    @property
    def requests(self) -> list[RequestRecord]:
        """Every HTTP request the client made (gateway websocket excluded), oldest first."""
        return self.rest.requests

    @property
    def intents(self) -> int:
        """Intents from the last IDENTIFY (0 before)."""
        return int((self.gateway.identify or {}).get("intents", 0))

    @property
    def message_content_intent(self) -> bool:
        """Whether the bot identified with MESSAGE_CONTENT; without it, Discord blanks message content
        except in DMs, messages that mention the bot, and the bot's own messages."""
        return bool(self.intents & INTENT_MESSAGE_CONTENT)

    @property
    def identify_count(self) -> int:
        return self.gateway.identify_count

    @property
    def resume_count(self) -> int:
        return self.gateway.resume_count

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        """The (created on first use) DM channel between ``user`` and the bot."""
        for ch in self.channels.values():
            if ch.is_dm and ch.recipient is user:
                return ch
        ch = FakeChannel(f"dm-{user.username}", type=1, recipient=user)
        self.channels[ch.id] = ch
        return ch

    def guild_of(self, channel: FakeChannel) -> FakeGuild | None:
        return next((g for g in self.guilds if g.id == channel.guild_id), None)

    def find_requests(self, method: str, path_regex: str) -> list[RequestRecord]:
        """Logged requests matching ``method`` (or ``"*"``) and ``re.search(path_regex, path)``."""
        pattern = re.compile(path_regex)
        return [r for r in self.requests if method in ("*", r.method) and pattern.search(r.path)]

    # -- waiting ---------------------------------------------------------------------------------------

    def _changed(self) -> None:
        """Wake every ``wait_for``: called after anything observable happens."""
        self._change.set()
        self._change = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], T | None], timeout: float = 60.0) -> T:
        """Re-evaluate ``predicate`` after every change until it returns something truthy; return that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"fake discord: condition not met within {timeout}s; recent requests: {self.requests[-8:]}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._change.wait(), remaining)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the client identified and READY + GUILD_CREATEs were sent."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def wait_commands_synced(self, *names: str, timeout: float = 60.0) -> None:
        """Until the client bulk-overwrote commands at least once and every name in ``names`` exists."""

        def synced() -> bool:
            have = {c["name"] for cmds in self.commands.values() for c in cmds}
            return self.command_syncs > 0 and have.issuperset(names)

        await self.wait_for(synced, timeout)

    async def wait_request(self, method: str, path_regex: str, timeout: float = 60.0) -> RequestRecord:
        """Until a matching request was logged (see ``find_requests``); returns the first match."""
        return await self.wait_for(lambda: next(iter(self.find_requests(method, path_regex)), None), timeout)

    # -- fault injection and gateway control --------------------------------------------------------

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        times: int = 1,
        json: JSON | None = None,
        retry_after: float | None = None,
    ) -> Fault:
        """Answer the next ``times`` matching requests with ``status`` instead of handling them.

        ``path_regex`` is searched in the path without ``/api/v10`` (e.g. ``r"/channels/\\d+/messages$"``);
        ``method`` may be ``"*"``. 429s carry the rate-limit headers discord.py needs to retry after
        ``retry_after`` (default 0.1 s). ``json`` overrides the default Discord error body. A ``status`` of 0
        (``RESET``) closes the connection instead of answering, as a network failure does.
        """
        fault = Fault(method.upper(), re.compile(path_regex), status, times, json, retry_after)
        self.rest.faults.append(fault)
        return fault

    def expire_token(self, token: str) -> None:
        """Make an interaction token stale: webhook calls get 401 50027, callbacks 404 10062."""
        self.rest.expired_tokens.add(token)
        inter = self._interactions_by_token.get(token)
        if inter is not None:
            inter.expired = True

    async def drop_gateway(self, code: int | None = 4000) -> None:
        """Close the gateway socket mid-session (``None``: abort TCP without a close frame).

        discord.py reconnects and RESUMEs; events dispatched meanwhile are replayed.
        """
        await self.gateway.drop(code)

    async def send_reconnect(self) -> None:
        """Gateway op 7: ask the client to reconnect and resume."""
        await self.gateway.send_op(RECONNECT)

    async def invalidate_session(self, resumable: bool = False) -> None:
        """Gateway op 9; with ``resumable=False`` the client must IDENTIFY again."""
        if not resumable:
            self.gateway.session_id = None
        await self.gateway.send_op(INVALID_SESSION, resumable)

    # -- payloads ----------------------------------------------------------------------------------------

    def _bot_user_payload(self) -> JSON:
        return {**self.bot_user.to_dict(), "verified": True, "mfa_enabled": False, "flags": 0, "email": None}

    def _application_payload(self) -> JSON:
        return {
            "id": str(self.app_id),
            "name": self.bot_user.username,
            "description": "",
            "summary": "",
            "icon": None,
            "cover_image": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.admin.to_dict(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": APP_FLAGS,
            "bot": self.bot_user.to_dict(),
            "rpc_origins": [],
            "tags": [],
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "approximate_guild_count": len(self.guilds),
            "integration_types_config": {"0": {}},
        }

    def _ready_payload(self, identify: JSON) -> JSON:
        return {
            "v": 10,
            "user": self._bot_user_payload(),
            "guilds": [{"id": str(g.id), "unavailable": True} for g in self.guilds],
            "session_id": self.gateway.session_id,
            "resume_gateway_url": self.gateway_url,
            "shard": identify.get("shard", [0, 1]),
            "application": {"id": str(self.app_id), "flags": APP_FLAGS},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "session_type": "normal",
            "user_settings": {},
        }

    def _members_chunk(self, d: JSON) -> JSON:
        gid = int(d["guild_id"])
        guild = next(g for g in self.guilds if g.id == gid)
        ids = {int(x) for x in d.get("user_ids") or []}
        query = (d.get("query") or "").lower()
        if ids:
            members = [m for m in guild.members if m.user.id in ids]
        else:
            members = [m for m in guild.members if m.user.username.lower().startswith(query)]
        return {
            "guild_id": str(gid),
            "members": [m.to_dict() for m in members],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
            "nonce": d.get("nonce"),
        }

    def _content_visible(self, message: FakeMessage) -> bool:
        return (
            self.message_content_intent
            or message.author is self.bot_user
            or message.guild_id is None
            or any(u is self.bot_user for u in message.mentions)
        )

    def message_payload(self, message: FakeMessage, *, redact: bool = False, nested: bool = False) -> JSON:
        """The Discord message object. ``redact`` applies the MESSAGE_CONTENT intent rule, as Discord does on
        the gateway and REST alike (not in interactions: a context menu gets the whole target message)."""
        visible = not redact or self._content_visible(message)
        data: JSON = {
            "id": str(message.id),
            "channel_id": str(message.channel_id),
            "author": message.author.to_dict(),
            "content": message.content if visible else "",
            "timestamp": iso(message.timestamp),
            "edited_timestamp": iso(message.edited_timestamp) if message.edited_timestamp else None,
            "tts": message.tts,
            "mention_everyone": False,
            "mentions": [u.to_dict() for u in message.mentions],
            "mention_roles": [],
            "attachments": [a.to_dict() for a in message.attachments] if visible else [],
            "embeds": message.embeds if visible else [],
            "components": message.components if visible else [],
            "pinned": False,
            "type": message.type,
            "flags": message.flags,
        }
        if message.guild_id is not None:
            data["guild_id"] = str(message.guild_id)
            guild = next((g for g in self.guilds if g.id == message.guild_id), None)
            member = guild.member(message.author) if guild else None
            if member is not None and message.webhook_id is None:
                data["member"] = member.to_dict(with_user=False)
        if message.webhook_id is not None:
            data["webhook_id"] = str(message.webhook_id)
            data["application_id"] = str(self.app_id)
        if message.interaction_metadata is not None:
            data["interaction_metadata"] = message.interaction_metadata
        if message.reference is not None:
            ref = message.reference
            data["message_reference"] = {
                "type": 0,
                "message_id": str(ref.id),
                "channel_id": str(ref.channel_id),
                **({"guild_id": str(ref.guild_id)} if ref.guild_id else {}),
            }
            if not nested:
                data["referenced_message"] = (
                    None if ref.deleted else self.message_payload(ref, redact=redact, nested=True)
                )
        return data

    def _channel_payload(self, channel: FakeChannel, user: FakeUser) -> JSON:
        guild = self.guild_of(channel)
        perms = guild.permissions(user) if guild else DEFAULT_PERMISSIONS
        return {**channel.to_dict(), "permissions": str(perms)}

    # -- attachments --------------------------------------------------------------------------------------

    def upload(
        self,
        filename: str,
        data: bytes,
        content_type: str | None = None,
        *,
        size: int | None = None,
        channel: FakeChannel | None = None,
        description: str | None = None,
    ) -> FakeAttachment:
        """Store bytes and serve them at the returned attachment's ``url``.

        ``content_type`` defaults to a guess from the filename; ``size`` to ``len(data)``. Pass other values
        to make the attachment object lie about the file.
        """
        aid = snowflake()
        width, height = _image_size(data)
        att = FakeAttachment(
            id=aid,
            filename=filename,
            data=data,
            url=f"{self.base_url}/attachments/{channel.id if channel else 0}/{aid}/{filename}",
            content_type=content_type or mimetypes.guess_type(filename)[0],
            size=len(data) if size is None else size,
            width=width,
            height=height,
            description=description,
        )
        self.attachments[aid] = att
        return att

    def _as_attachment(self, spec: AttachmentSpec, channel: FakeChannel) -> FakeAttachment:
        if isinstance(spec, FakeAttachment):
            return spec
        if len(spec) == 3:
            return self.upload(spec[0], spec[1], spec[2], channel=channel)
        return self.upload(spec[0], spec[1], channel=channel)

    # -- things users do ------------------------------------------------------------------------------------

    async def user_message(
        self,
        content: str = "",
        *,
        author: FakeUser | None = None,
        channel: FakeChannel | None = None,
        attachments: list[AttachmentSpec] | None = None,
        reply_to: FakeMessage | None = None,
        mentions: list[FakeUser] | None = None,
        mention_replied: bool = True,
    ) -> FakeMessage:
        """Post a message as a user and dispatch MESSAGE_CREATE (subject to intents and the content rule).

        Users written as ``<@id>`` in ``content`` are mentioned automatically. A reply pings the replied-to
        author unless ``mention_replied=False``; replying to the bot therefore exposes content without
        the MESSAGE_CONTENT intent, exactly as on Discord.
        """
        author = author or self.alice
        channel = channel or self.channel
        message = FakeMessage(
            channel_id=channel.id,
            guild_id=channel.guild_id,
            author=author,
            content=content,
            attachments=[self._as_attachment(a, channel) for a in attachments or []],
            reference=reply_to,
            type=MSG_REPLY if reply_to else MSG_DEFAULT,
        )
        message.mentions = self._mentions_in(content, mentions or [])
        if reply_to is not None and mention_replied and reply_to.author not in message.mentions:
            message.mentions.append(reply_to.author)
        await self._add_message(message)
        return message

    async def slash_command(
        self,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        user: FakeUser | None = None,
        channel: FakeChannel | None = None,
        attachments: Mapping[str, AttachmentSpec] | None = None,
        check_permissions: bool = True,
    ) -> FakeInteraction:
        """Invoke a synced chat-input command (``"group sub"`` for subcommands).

        Option values are typed by the synced definition: str, int, float, bool, ``FakeUser``,
        ``FakeChannel``, ``FakeRole``, or for attachments a ``FakeAttachment`` or
        ``(filename, bytes[, content_type])``; ``attachments`` is merged into ``options``.
        Like Discord, refuses (``PermissionError``) commands the user could not see: missing
        ``default_member_permissions``, or an NSFW command outside an NSFW channel.
        ``check_permissions=False`` skips that, to test the bot's own checks.
        """
        user, channel = user or self.alice, channel or self.channel
        data, command = self._command_data(name, 1, user, channel, check_permissions)
        values = {**(options or {}), **(attachments or {})}
        resolved: JSON = {}
        data["options"] = self._build_options(command, name, values, resolved, channel)
        if resolved:
            data["resolved"] = resolved
        return await self._dispatch_interaction(2, data, user=user, channel=channel)

    async def autocomplete(
        self,
        name: str,
        options: Mapping[str, Any],
        focused: str,
        *,
        user: FakeUser | None = None,
        channel: FakeChannel | None = None,
    ) -> FakeInteraction:
        """An APPLICATION_COMMAND_AUTOCOMPLETE for option ``focused``; choices arrive as callback type 8."""
        user, channel = user or self.alice, channel or self.channel
        data, command = self._command_data(name, 1, user, channel, True)
        data["options"] = self._build_options(command, name, options, {}, channel, focused)
        return await self._dispatch_interaction(4, data, user=user, channel=channel)

    async def context_menu(
        self,
        name: str,
        target: FakeMessage | FakeUser,
        *,
        user: FakeUser | None = None,
        channel: FakeChannel | None = None,
        check_permissions: bool = True,
    ) -> FakeInteraction:
        """A message (target ``FakeMessage``) or user (target ``FakeUser``) context-menu command.

        The target message is sent in full (content included), as Discord does regardless of intents.
        """
        user = user or self.alice
        if isinstance(target, FakeMessage):
            channel = channel or self.channels[target.channel_id]
            data, _ = self._command_data(name, 3, user, channel, check_permissions)
            data["resolved"] = {"messages": {str(target.id): self.message_payload(target)}}
        else:
            channel = channel or self.channel
            data, _ = self._command_data(name, 2, user, channel, check_permissions)
            data["resolved"] = self._resolved_user(target, channel)
        data["target_id"] = str(target.id)
        return await self._dispatch_interaction(2, data, user=user, channel=channel)

    async def message_component(
        self,
        custom_id: str,
        message: FakeMessage,
        *,
        user: FakeUser | None = None,
        component_type: int = 2,
        values: list[str] | None = None,
    ) -> FakeInteraction:
        """Click a button (``component_type=2``) or pick ``values`` in a select, on a bot message."""
        data: JSON = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            data["values"] = values
        channel = self.channels[message.channel_id]
        return await self._dispatch_interaction(3, data, user=user, channel=channel, message=message)

    async def modal_submit(
        self,
        custom_id: str,
        values: Mapping[str, str],
        *,
        user: FakeUser | None = None,
        channel: FakeChannel | None = None,
        message: FakeMessage | None = None,
    ) -> FakeInteraction:
        """Submit a modal: ``values`` maps text-input custom_id -> typed text."""
        rows = [{"type": 1, "components": [{"type": 4, "custom_id": k, "value": v}]} for k, v in values.items()]
        data: JSON = {"custom_id": custom_id, "components": rows}
        channel = channel or (self.channels[message.channel_id] if message else self.channel)
        return await self._dispatch_interaction(5, data, user=user, channel=channel, message=message)

    # -- interaction plumbing ------------------------------------------------------------------------------

    def find_command(self, name: str, type: int = 1, guild_id: int | None = None) -> tuple[JSON, int | None]:
        """A synced command by name/type, guild commands first; returns it and its guild (None = global)."""
        for gid in [guild_id, None] if guild_id is not None else [None]:
            for cmd in self.commands.get(gid, []):
                if cmd["name"] == name and cmd.get("type", 1) == type:
                    return cmd, gid
        synced = {gid: [c["name"] for c in cmds] for gid, cmds in self.commands.items()}
        raise LookupError(f"command {name!r} (type {type}) is not synced; synced: {synced}")

    def _command_data(
        self, name: str, type: int, user: FakeUser, channel: FakeChannel, check_permissions: bool
    ) -> tuple[JSON, JSON]:
        """The interaction ``data`` skeleton for command ``name``, and the synced definition."""
        # Only slash commands have subcommands ("group sub"); context menu names may contain spaces.
        root = name.split()[0] if type == 1 else name
        command, gid = self.find_command(root, type, channel.guild_id)
        guild = self.guild_of(channel)
        if check_permissions and guild is not None:
            required = command.get("default_member_permissions")
            need = (int(required) or ADMINISTRATOR) if required is not None else 0  # "0" = admins only
            if guild.permissions(user) & need != need:
                raise PermissionError(f"Discord hides {root!r} from {user.username} (needs permissions {need})")
            if command.get("nsfw") and not channel.nsfw:
                raise PermissionError(f"Discord refuses age-restricted {root!r} in non-NSFW #{channel.name}")
        data: JSON = {"id": command["id"], "name": root, "type": type}
        if gid is not None:
            data["guild_id"] = str(gid)
        return data, command

    def _build_options(
        self,
        command: JSON,
        name: str,
        values: Mapping[str, Any],
        resolved: JSON,
        channel: FakeChannel,
        focused: str | None = None,
    ) -> list[JSON]:
        # Walk "group sub" down the definition, then wrap the leaf options back up.
        path: list[JSON] = []
        definition = command
        for part in name.split()[1:]:
            definition = next(
                o
                for o in definition.get("options", [])
                if o["name"] == part and o["type"] in (OPT_SUBCOMMAND, OPT_GROUP)
            )
            path.append(definition)
        defs = {o["name"]: o for o in definition.get("options", [])}
        unknown = set(values) - set(defs)
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}; defined: {sorted(defs)}")
        options: list[JSON] = []
        for opt_name, opt in defs.items():
            if opt_name not in values:
                if opt.get("required") and focused is None:
                    raise ValueError(f"{name}: required option {opt_name!r} missing")
                continue
            value = self._option_value(opt["type"], values[opt_name], resolved, channel, opt_name == focused)
            entry: JSON = {"name": opt_name, "type": opt["type"], "value": value}
            if opt_name == focused:
                entry["focused"] = True
            options.append(entry)
        for sub in reversed(path):
            options = [{"name": sub["name"], "type": sub["type"], "options": options}]
        return options

    def _option_value(self, type: int, value: Any, resolved: JSON, channel: FakeChannel, focused: bool) -> Any:
        if focused:  # an autocomplete value is whatever the user has typed so far
            return str(value)
        if type == OPT_STRING:
            return str(value)
        if type == OPT_INTEGER:
            return int(value)
        if type == OPT_NUMBER:
            return float(value)
        if type == OPT_BOOLEAN:
            return bool(value)
        if type == OPT_ATTACHMENT:
            att = self._as_attachment(value, channel)
            att.ephemeral = True
            resolved.setdefault("attachments", {})[str(att.id)] = att.to_dict()
            return str(att.id)
        if type == OPT_USER:
            for key, val in self._resolved_user(value, channel).items():
                resolved.setdefault(key, {}).update(val)
            return str(value.id)
        if type == OPT_CHANNEL:
            resolved.setdefault("channels", {})[str(value.id)] = self._channel_payload(value, self.bot_user)
            return str(value.id)
        if type == OPT_ROLE:
            resolved.setdefault("roles", {})[str(value.id)] = value.to_dict()
            return str(value.id)
        raise ValueError(f"option type {type} not supported by the fake")

    def _resolved_user(self, user: FakeUser, channel: FakeChannel) -> JSON:
        resolved: JSON = {"users": {str(user.id): user.to_dict()}}
        guild = self.guild_of(channel)
        member = guild.member(user) if guild else None
        if guild is not None and member is not None:
            member_data = {**member.to_dict(with_user=False), "permissions": str(guild.permissions(user))}
            resolved["members"] = {str(user.id): member_data}
        return resolved

    async def _dispatch_interaction(
        self,
        type: int,
        data: JSON,
        *,
        user: FakeUser | None,
        channel: FakeChannel,
        message: FakeMessage | None = None,
    ) -> FakeInteraction:
        user = user or self.alice
        guild = self.guild_of(channel)
        iid, token = snowflake(), secrets.token_urlsafe(48)
        payload: JSON = {
            "id": str(iid),
            "application_id": str(self.app_id),
            "type": type,
            "data": data,
            "token": token,
            "version": 1,
            "channel_id": str(channel.id),
            "channel": self._channel_payload(channel, user),
            "locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": self.upload_limit,
            "app_permissions": str(guild.permissions(self.bot_user) if guild else DEFAULT_PERMISSIONS),
            # Integration owner "0" = guild install, "1" = user install.
            "authorizing_integration_owners": {"0": str(guild.id)} if guild else {"1": str(user.id)},
            "context": 0 if guild else 1,  # GUILD or BOT_DM
        }
        if guild is not None:
            member = guild.member(user)
            if member is None:
                raise ValueError(f"{user.username} is not a member of {guild.name}")
            payload["guild_id"] = str(guild.id)
            payload["guild_locale"] = "en-US"
            payload["guild"] = {"id": str(guild.id), "locale": "en-US", "features": []}
            payload["member"] = {**member.to_dict(), "permissions": str(guild.permissions(user))}
        else:
            payload["user"] = user.to_dict()
        if message is not None:
            payload["message"] = self.message_payload(message)
        inter = FakeInteraction(
            id=iid,
            token=token,
            type=type,
            payload=payload,
            user=user,
            channel=channel,
            dispatched_at=time.monotonic(),
            fake=self,
            source_message=message,
        )
        self.interactions.append(inter)
        self._interactions_by_token[token] = inter
        await self.gateway.dispatch("INTERACTION_CREATE", payload)
        return inter

    def _interaction_message(self, inter: FakeInteraction, flags: int) -> FakeMessage:
        """A new bot message belonging to ``inter`` (not yet stored)."""
        data = inter.payload.get("data", {})
        metadata: JSON = {
            "id": str(inter.id),
            "type": inter.type,
            "user": inter.user.to_dict(),
            "authorizing_integration_owners": inter.payload["authorizing_integration_owners"],
        }
        if inter.original is not None:
            metadata["original_response_message_id"] = str(inter.original.id)
        if inter.source_message is not None:
            metadata["interacted_message_id"] = str(inter.source_message.id)
        if data.get("type") == 3:
            metadata["target_message_id"] = data["target_id"]
        elif data.get("type") == 2:
            metadata["target_user"] = self.users[int(data["target_id"])].to_dict()
        msg_type = MSG_DEFAULT
        if inter.type == 2:
            msg_type = MSG_CHAT_INPUT if data.get("type", 1) == 1 else MSG_CONTEXT_MENU
        return FakeMessage(
            channel_id=inter.channel.id,
            guild_id=inter.channel.guild_id,
            author=self.bot_user,
            flags=flags,
            type=msg_type,
            interaction_id=inter.id,
            webhook_id=self.app_id,
            interaction_metadata=metadata,
        )

    async def _interaction_callback(self, inter: FakeInteraction, body: JSON, files: list[UploadedFile]) -> JSON:
        arrived = time.monotonic()
        cb_type = int(body.get("type", 0))
        data: JSON = body.get("data") or {}
        record = CallbackRecord(cb_type, data, files, arrived, arrived - inter.dispatched_at, status=200)

        def reject(error: ApiError) -> ApiError:
            record.status, record.error = error.status, str(error.body.get("message"))
            inter.callbacks.append(record)
            return error

        if inter.expired:
            raise reject(ApiError(404, 10062, "Unknown interaction"))
        if self.interaction_deadline is not None and record.latency > self.interaction_deadline:
            late = ApiError(404, 10062, "Unknown interaction")
            late.body["message"] += f" (callback after {record.latency:.2f}s > {self.interaction_deadline}s)"
            raise reject(late)
        if inter.callback is not None:
            raise reject(ApiError(400, 40060, "Interaction has already been acknowledged."))

        message: FakeMessage | None = None
        try:
            if cb_type == 4:  # CHANNEL_MESSAGE_WITH_SOURCE
                message = self._interaction_message(inter, int(data.get("flags") or 0) & EPHEMERAL)
                self._apply_payload(message, data, files, creating=True)
            elif cb_type == 5:  # DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: a "thinking..." placeholder
                flags = LOADING | (int(data.get("flags") or 0) & EPHEMERAL)
                message = self._interaction_message(inter, flags)
            elif cb_type in (6, 7):  # DEFERRED_UPDATE_MESSAGE / UPDATE_MESSAGE
                if inter.source_message is None:
                    raise ApiError(400, 40004, "Interaction response type not allowed for this interaction")
                inter.original = inter.source_message
                if cb_type == 7:
                    await self._edit_message(inter.source_message, data, files)
                    message = inter.source_message
        except ApiError as exc:
            raise reject(exc) from None

        if message is not None and inter.original is None:
            inter.original = message
            await self._add_message(message)
        inter.callbacks.append(record)
        self._changed()
        interaction: JSON = {
            "id": str(inter.id),
            "type": inter.type,
            "response_message_id": str(message.id) if message else None,
            "response_message_loading": bool(message and message.loading),
            "response_message_ephemeral": bool(message and message.ephemeral),
        }
        result: JSON = {"interaction": interaction}
        if message is not None:
            result["resource"] = {"type": cb_type, "message": self.message_payload(message)}
        return result

    async def _followup(self, inter: FakeInteraction, body: JSON, files: list[UploadedFile]) -> FakeMessage:
        if inter.callback is None:
            raise ApiError(404, 10015, "Unknown Webhook")
        original = inter.original
        if original is not None and original.loading and not original.deleted:
            # After a type-5 defer, Discord turns the first followup into the "thinking" message.
            await self._edit_message(original, body, files)
            return original
        message = self._interaction_message(inter, int(body.get("flags") or 0) & EPHEMERAL)
        self._apply_payload(message, body, files, creating=True)
        inter.followups.append(message)
        await self._add_message(message)
        return message

    # -- message bookkeeping ------------------------------------------------------------------------------

    def _mentions_in(self, content: str, extra: list[FakeUser]) -> list[FakeUser]:
        mentioned = list(extra)
        for uid in re.findall(r"<@!?(\d+)>", content):
            user = self.users.get(int(uid))
            if user is not None and user not in mentioned:
                mentioned.append(user)
        return mentioned

    def _apply_payload(self, message: FakeMessage, body: JSON, files: list[UploadedFile], *, creating: bool) -> None:
        """Apply a create/edit body (plus multipart files) to ``message``, validating like Discord."""
        content = (body.get("content") or "") if "content" in body else message.content
        if len(content) > MAX_CONTENT:
            raise form_error("content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length.")
        embeds = list(body.get("embeds") or []) if "embeds" in body else message.embeds
        if len(embeds) > MAX_EMBEDS:
            raise form_error("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")

        uploads = {f.field_name: f for f in files}
        if sum(len(f.data) for f in files) > self.upload_limit:
            raise ApiError(413, 40005, "Request entity too large")
        if "attachments" in body:
            attachments: list[FakeAttachment] = []
            existing = {a.id: a for a in message.attachments}
            for entry in body.get("attachments") or []:
                key = int(entry["id"])
                if key in existing:
                    attachments.append(existing[key])
                    continue
                upload = uploads.get(f"files[{key}]")
                if upload is None:
                    raise form_error("attachments", "ATTACHMENT_NOT_FOUND", f"Unknown attachment {key}")
                filename = entry.get("filename") or upload.filename
                att = self.upload(filename, upload.data, channel=self.channels.get(message.channel_id))
                att.description = entry.get("description")
                attachments.append(att)
        else:
            channel = self.channels.get(message.channel_id)
            new = [self.upload(f.filename, f.data, channel=channel) for f in files]
            attachments = message.attachments + new
        if len(attachments) > MAX_FILES:
            raise form_error("attachments", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_FILES} or fewer items.")
        components = list(body.get("components") or []) if "components" in body else message.components

        if creating and not (content or embeds or attachments or components or body.get("sticker_ids")):
            raise ApiError(400, 50006, "Cannot send an empty message")

        message.content, message.embeds, message.components = content, embeds, components
        message.attachments = attachments
        if "allowed_mentions" in body:
            message.allowed_mentions = body["allowed_mentions"]
        if creating:
            message.flags |= int(body.get("flags") or 0) & ~LOADING
            message.tts = bool(body.get("tts", False))
        else:
            message.flags &= ~LOADING
            if "flags" in body:  # only SUPPRESS_EMBEDS may change after creation
                message.flags = (message.flags & ~4) | (int(body["flags"] or 0) & 4)
        # A reply pings the replied-to author unless allowed_mentions says otherwise.
        replied = (body.get("allowed_mentions") or {}).get("replied_user", "allowed_mentions" not in body)
        pinged = [message.reference.author] if message.reference is not None and replied else []
        message.mentions = self._mentions_in(content, pinged)
        message.raw = body
        for att in message.attachments:
            self.attachments[att.id] = att

    async def _bot_channel_message(self, channel: FakeChannel, body: JSON, files: list[UploadedFile]) -> FakeMessage:
        message = FakeMessage(channel_id=channel.id, guild_id=channel.guild_id, author=self.bot_user)
        ref = body.get("message_reference")
        if ref:
            target = next((m for m in self.messages if str(m.id) == str(ref.get("message_id"))), None)
            if target is None or target.deleted:
                if ref.get("fail_if_not_exists", True):
                    raise form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
            else:
                message.reference, message.type = target, MSG_REPLY
        self._apply_payload(message, body, files, creating=True)
        await self._add_message(message)
        return message

    async def _add_message(self, message: FakeMessage) -> None:
        self.messages.append(message)
        self._changed()
        await self._dispatch_message_event("MESSAGE_CREATE", message)

    async def _edit_message(self, message: FakeMessage, body: JSON, files: list[UploadedFile]) -> None:
        if message.author is not self.bot_user:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        self._apply_payload(message, body, files, creating=False)
        message.edits += 1
        message.edited_timestamp = now()
        self._changed()
        await self._dispatch_message_event("MESSAGE_UPDATE", message)

    async def _delete_message(self, message: FakeMessage) -> None:
        if message.deleted:
            raise unknown_message()
        message.deleted = True
        self._changed()
        if not message.ephemeral and self._wants_messages(message):
            data = {"id": str(message.id), "channel_id": str(message.channel_id)}
            if message.guild_id is not None:
                data["guild_id"] = str(message.guild_id)
            await self.gateway.dispatch("MESSAGE_DELETE", data)

    def _wants_messages(self, message: FakeMessage) -> bool:
        intent = INTENT_DIRECT_MESSAGES if message.guild_id is None else INTENT_GUILD_MESSAGES
        return bool(self.intents & intent)

    async def _dispatch_message_event(self, event: str, message: FakeMessage) -> None:
        # Ephemeral messages only exist for the invoking user: Discord sends no gateway event for them.
        if message.ephemeral or not self._wants_messages(message):
            return
        await self.gateway.dispatch(event, self.message_payload(message, redact=True))

    def _sync_commands(self, guild_id: int | None, body: list[JSON]) -> list[JSON]:
        """Bulk overwrite: keep ids of commands that survive by (name, type), like Discord."""
        old = {(c["name"], c.get("type", 1)): c for c in self.commands.get(guild_id, [])}
        synced = []
        for cmd in body:
            previous = old.get((cmd["name"], cmd.get("type", 1)))
            stored: JSON = {
                "description": "",
                "type": 1,
                "options": [],
                "default_member_permissions": None,
                "nsfw": False,
                **cmd,
                "id": previous["id"] if previous else str(snowflake()),
                "application_id": str(self.app_id),
                "version": str(snowflake()),
            }
            if guild_id is not None:
                stored["guild_id"] = str(guild_id)
            synced.append(stored)
        self.commands[guild_id] = synced
        self.command_syncs += 1
        self._changed()
        return synced
