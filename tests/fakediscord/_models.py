"""Plain records for the fake Discord: the world (users, guilds, channels) and what happened in it.

Everything here is data plus ``to_dict`` helpers that render Discord API payloads. Behaviour lives
in ``_fake.py`` (state changes), ``_rest.py`` (HTTP) and ``_gateway.py`` (websocket).
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._fake import FakeDiscord

JSON = dict[str, Any]

DISCORD_EPOCH_MS = 1420070400000

# Permission bits (https://discord.com/developers/docs/topics/permissions).
ADMINISTRATOR = 1 << 3
ALL_PERMISSIONS = (1 << 51) - 1
# Roughly what a fresh guild gives @everyone: view, send, history, reactions, embeds, files,
# external emojis, application commands, threads.
DEFAULT_PERMISSIONS = (
    (1 << 6) | (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 18) | (1 << 31) | (1 << 38)
)

EPHEMERAL = 1 << 6
LOADING = 1 << 7

INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

_id_lock = threading.Lock()
_id_counter = itertools.count()
_last_id = 0


def snowflake() -> int:
    """A strictly increasing, realistic snowflake (timestamp in the high bits), so ids sort by age."""
    global _last_id
    with _id_lock:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        candidate = (ms << 22) | (next(_id_counter) & 0xFFF)
        _last_id = max(candidate, _last_id + 1)
        return _last_id


def iso(when: dt.datetime) -> str:
    return when.isoformat()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(eq=False)
class FakeUser:
    """A Discord user. ``bot=True`` for the bot account the client logs in as."""

    username: str
    id: int = field(default_factory=snowflake)
    bot: bool = False

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def to_dict(self) -> JSON:
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.username,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass(eq=False)
class FakeRole:
    """A guild role. The @everyone role's id equals the guild id."""

    name: str
    permissions: int = DEFAULT_PERMISSIONS
    id: int = field(default_factory=snowflake)
    position: int = 0
    bot_id: int | None = None  # set for the bot's managed integration role

    def to_dict(self) -> JSON:
        data: JSON = {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "managed": self.bot_id is not None,
            "mentionable": False,
            "flags": 0,
        }
        if self.bot_id is not None:
            data["tags"] = {"bot_id": str(self.bot_id)}
        return data


@dataclass(eq=False)
class FakeChannel:
    """A guild text channel (type 0) or a DM channel (type 1, ``recipient`` set)."""

    name: str
    id: int = field(default_factory=snowflake)
    nsfw: bool = False
    type: int = 0
    guild_id: int | None = None
    position: int = 0
    recipient: FakeUser | None = None

    @property
    def is_dm(self) -> bool:
        return self.type == 1

    def to_dict(self) -> JSON:
        if self.is_dm:
            assert self.recipient is not None
            return {
                "id": str(self.id),
                "type": 1,
                "last_message_id": None,
                "recipients": [self.recipient.to_dict()],
                "flags": 0,
            }
        data: JSON = {
            "id": str(self.id),
            "type": self.type,
            "name": self.name,
            "position": self.position,
            "nsfw": self.nsfw,
            "topic": None,
            "parent_id": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permission_overwrites": [],
            "flags": 0,
        }
        if self.guild_id is not None:
            data["guild_id"] = str(self.guild_id)
        return data


@dataclass(eq=False)
class FakeMember:
    user: FakeUser
    roles: list[FakeRole] = field(default_factory=list)
    joined_at: dt.datetime = field(default_factory=now)

    def to_dict(self, *, with_user: bool = True) -> JSON:
        data: JSON = {
            "roles": [str(r.id) for r in self.roles],
            "joined_at": iso(self.joined_at),
            "nick": None,
            "avatar": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "premium_since": None,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.to_dict()
        return data


@dataclass(eq=False)
class FakeGuild:
    """A guild. ``roles[0]`` must be @everyone (``id == guild id``); ``FakeGuild.create`` does that."""

    id: int
    name: str
    owner_id: int
    roles: list[FakeRole]
    channels: list[FakeChannel] = field(default_factory=list)
    members: list[FakeMember] = field(default_factory=list)

    @classmethod
    def create(cls, name: str, owner: FakeUser, *, channels: list[FakeChannel] | None = None) -> FakeGuild:
        gid = snowflake()
        guild = cls(id=gid, name=name, owner_id=owner.id, roles=[FakeRole("@everyone", id=gid)])
        for pos, ch in enumerate(channels or []):
            guild.add_channel(ch, position=pos)
        return guild

    @property
    def everyone(self) -> FakeRole:
        return self.roles[0]

    def add_channel(self, channel: FakeChannel, *, position: int | None = None) -> FakeChannel:
        channel.guild_id = self.id
        channel.position = len(self.channels) if position is None else position
        self.channels.append(channel)
        return channel

    def add_member(self, user: FakeUser, *roles: FakeRole) -> FakeMember:
        member = FakeMember(user, list(roles))
        self.members.append(member)
        return member

    def member(self, user: FakeUser) -> FakeMember | None:
        return next((m for m in self.members if m.user.id == user.id), None)

    def permissions(self, user: FakeUser) -> int:
        """Guild-level permissions (no channel overwrites): owner/administrator get everything."""
        if user.id == self.owner_id:
            return ALL_PERMISSIONS
        member = self.member(user)
        perms = self.everyone.permissions
        for role in member.roles if member else []:
            perms |= role.permissions
        return ALL_PERMISSIONS if perms & ADMINISTRATOR else perms

    def to_dict(self) -> JSON:
        """The full GUILD_CREATE payload."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "unavailable": False,
            "large": False,
            "member_count": len(self.members),
            "joined_at": iso(now()),
            "roles": [r.to_dict() for r in self.roles],
            "channels": [c.to_dict() for c in self.channels],
            "members": [m.to_dict() for m in self.members],
            "threads": [],
            "presences": [],
            "voice_states": [],
            "emojis": [],
            "stickers": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "features": [],
            "preferred_locale": "en-US",
            "premium_tier": 0,
            "nsfw_level": 0,
            "verification_level": 0,
            "mfa_level": 0,
            "explicit_content_filter": 0,
            "default_message_notifications": 0,
            "system_channel_id": None,
            "afk_channel_id": None,
            "afk_timeout": 300,
            "application_id": None,
        }


@dataclass(eq=False)
class FakeAttachment:
    """An uploaded file, served by the fake at ``url``. ``size``/``content_type`` are what the attachment
    object *claims*; tests may set them to lie about ``data``."""

    filename: str
    data: bytes
    url: str
    content_type: str | None
    size: int
    id: int = field(default_factory=snowflake)
    width: int | None = None
    height: int | None = None
    description: str | None = None
    ephemeral: bool = False

    def to_dict(self) -> JSON:
        data: JSON = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "ephemeral": self.ephemeral,
            "flags": 0,
        }
        if self.description is not None:
            data["description"] = self.description
        return data


@dataclass(eq=False)
class FakeMessage:
    """A message in a channel, posted by a user (``fake.user_message``) or the bot (REST).

    Bot edits are applied in place, so a record always shows the latest state; ``edits`` counts them.
    ``raw`` is the last JSON body the bot sent for it (create or edit).
    """

    channel_id: int
    guild_id: int | None
    author: FakeUser
    content: str = ""
    id: int = field(default_factory=snowflake)
    embeds: list[JSON] = field(default_factory=list)
    components: list[JSON] = field(default_factory=list)
    attachments: list[FakeAttachment] = field(default_factory=list)
    flags: int = 0
    allowed_mentions: JSON | None = None
    mentions: list[FakeUser] = field(default_factory=list)
    reference: FakeMessage | None = None
    type: int = 0
    tts: bool = False
    interaction_id: int | None = None
    webhook_id: int | None = None
    timestamp: dt.datetime = field(default_factory=now)
    edited_timestamp: dt.datetime | None = None
    edits: int = 0
    deleted: bool = False
    reactions: list[str] = field(default_factory=list)
    raw: JSON = field(default_factory=dict)
    interaction_metadata: JSON | None = None

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True for the "bot is thinking..." placeholder a type-5 defer creates."""
        return bool(self.flags & LOADING)

    def file(self, index: int = 0) -> bytes:
        """Bytes of the ``index``-th attachment."""
        return self.attachments[index].data


@dataclass(eq=False)
class UploadedFile:
    """One ``files[n]`` part of a multipart request."""

    field_name: str
    filename: str
    content_type: str
    data: bytes


@dataclass(eq=False)
class RequestRecord:
    """One HTTP request the client made. ``path`` excludes the ``/api/v10`` prefix."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    files: list[UploadedFile]
    at: float  # time.monotonic()
    status: int = 0
    unhandled: bool = False

    def __repr__(self) -> str:
        return f"<{self.method} {self.path} -> {self.status}>"


@dataclass(eq=False)
class CallbackRecord:
    """One ``POST /interactions/{id}/{token}/callback`` attempt.

    ``status`` is what the fake answered: 200/204 accepted, 404 too late (``interaction_deadline``) or
    expired, 400 already acknowledged.
    """

    type: int
    data: JSON
    files: list[UploadedFile]
    arrived_at: float
    latency: float  # seconds since the INTERACTION_CREATE was dispatched
    status: int
    error: str | None = None

    @property
    def ephemeral(self) -> bool:
        return bool(int(self.data.get("flags") or 0) & EPHEMERAL)


@dataclass(eq=False)
class FakeInteraction:
    """An INTERACTION_CREATE the fake dispatched, and everything the bot did in response."""

    id: int
    token: str
    type: int
    payload: JSON
    user: FakeUser
    channel: FakeChannel
    dispatched_at: float
    fake: FakeDiscord = field(repr=False)
    source_message: FakeMessage | None = None  # the message a component was clicked on
    callbacks: list[CallbackRecord] = field(default_factory=list)
    original: FakeMessage | None = None
    followups: list[FakeMessage] = field(default_factory=list)
    expired: bool = False

    @property
    def callback(self) -> CallbackRecord | None:
        """The accepted callback, if any."""
        return next((c for c in self.callbacks if c.status < 300), None)

    @property
    def messages(self) -> list[FakeMessage]:
        """@original (if any) then followups, in creation order."""
        return ([self.original] if self.original else []) + self.followups

    async def wait_callback(self, timeout: float = 60.0) -> CallbackRecord:
        """Wait for the first callback attempt; raise AssertionError if the fake rejected it."""
        cb = await self.fake.wait_for(lambda: self.callbacks[0] if self.callbacks else None, timeout)
        if cb.status >= 300:
            raise AssertionError(f"interaction callback rejected ({cb.status}): {cb.error}")
        return cb

    async def wait_message(
        self, predicate: Callable[[FakeMessage], object] | None = None, timeout: float = 60.0
    ) -> FakeMessage:
        """Wait until @original or a followup satisfies ``predicate(message)``.

        Default predicate: a real (not "thinking..."), undeleted message. Edits count, so
        ``lambda m: m.attachments`` waits for the edit that adds an image.
        """

        def default(m: FakeMessage) -> bool:
            return not m.loading and not m.deleted

        pred = predicate or default
        return await self.fake.wait_for(lambda: next((m for m in self.messages if pred(m)), None), timeout)
