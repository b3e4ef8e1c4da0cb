"""A local fake Discord (REST + gateway) that the real discord.py client talks to over sockets.

Typical use::

    async with FakeDiscord() as fake, run_client(fake, bot):
        await fake.wait_commands_synced("imagine")
        inter = await fake.slash_command("imagine", {"prompt": "a cat"})
        cb = await inter.wait_callback()
        msg = await inter.wait_message(lambda m: m.attachments)

Build clients with ``guild_ready_timeout`` small (e.g. 0.05): discord.py waits that long after the
last GUILD_CREATE before firing ``on_ready``.
"""

from ._client import run_client
from ._fake import FakeDiscord
from ._models import (
    CallbackRecord,
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeInteraction,
    FakeMember,
    FakeMessage,
    FakeRole,
    FakeUser,
    RequestRecord,
    UploadedFile,
)
from ._rest import RESET, ApiError, Fault

__all__ = [
    "RESET",
    "ApiError",
    "CallbackRecord",
    "FakeAttachment",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMember",
    "FakeMessage",
    "FakeRole",
    "FakeUser",
    "Fault",
    "RequestRecord",
    "UploadedFile",
    "run_client",
]
