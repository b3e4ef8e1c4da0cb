"""Init images, fetched only from where Discord serves them.

A URL in an attachment or an embed is data the sender controls, so it is never trusted as it is:
- only Discord's CDN hosts, and the host of the API base discord.py uses (`discord.http.Route.BASE`, which is how
  tests point the bot at a fake Discord), are ever requested, and a redirect is followed only onto those;
- the size cap holds while the bytes stream in, whatever the attachment claims;
- one download at a time per user, through one shared HTTP session, each within a time limit;
- the bytes must decode as an image (`sdengine.decode_image`) before anything else sees them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import urljoin

import aiohttp
import discord
import yarl

import sdengine
from bot.replies import UserError

log = logging.getLogger(__name__)

CDN_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
MAX_REDIRECTS = 3
TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10, sock_read=20)
TOO_SLOW = "Downloading that image took too long: try again, or attach a smaller one."

ImageSource = discord.Attachment | discord.Embed  # an attachment, or an embed that shows an image


@dataclass(frozen=True)
class InitImage:
    data: bytes
    width: int
    height: int


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _origin(url: yarl.URL) -> tuple[str, str, int | None]:
    return url.scheme, (url.host or "").lower(), url.port


def allowed_origins() -> set[tuple[str, str, int | None]]:
    """Discord's CDN over https, and the origin of the API base discord.py talks to."""
    origins: set[tuple[str, str, int | None]] = {("https", host, 443) for host in CDN_HOSTS}
    origins.add(_origin(yarl.URL(discord.http.Route.BASE)))
    return origins


def embed_url(embed: discord.Embed) -> str | None:
    """The Discord-served copy of an embed's image or thumbnail; the original URL points anywhere."""
    return embed.image.proxy_url or embed.thumbnail.proxy_url


class Downloader:
    """Fetches init images for the whole bot; `close()` it with the bot."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None
        self._busy: set[int] = set()  # users with a download in flight

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, source: ImageSource, user_id: int) -> InitImage:
        """The image's bytes and size, or a UserError that says what to change."""
        limit = self.max_bytes
        if isinstance(source, discord.Attachment):
            if source.size > limit:
                raise UserError(f"The image is {_mib(source.size)}: attach one under {_mib(limit)}.")
            content_type = (source.content_type or "").split(";")[0].strip()
            if not (content_type.startswith("image/") or source.filename.lower().endswith(IMAGE_SUFFIXES)):
                raise UserError("That file is not an image: attach a PNG, JPEG, WebP or GIF.")
            url: str | None = source.url
        else:
            url = embed_url(source)
        if not url:
            raise UserError("That message has no image to make variations of.")
        if user_id in self._busy:
            raise UserError("I am still downloading your last image: wait for it, then try again.")
        self._busy.add(user_id)
        try:
            data = await self._get(url)
        finally:
            self._busy.discard(user_id)
        try:  # reported now, not after waiting in the queue
            image = await asyncio.to_thread(sdengine.decode_image, data, max_bytes=limit)
        except sdengine.InvalidRequest as exc:
            raise UserError(str(exc)) from exc
        return InitImage(data, image.width, image.height)

    async def _get(self, url: str) -> bytes:
        """The body at `url`, read up to the size cap, following redirects only between allowed origins."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        origins = allowed_origins()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                if _origin(yarl.URL(url)) not in origins:
                    log.warning("refused to download an image from %r: not a Discord host", url)
                    raise UserError("I only download images that Discord hosts: attach the image instead.")
                async with self._session.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    response.raise_for_status()
                    return await self._read(response)
        except TimeoutError as exc:
            raise UserError(TOO_SLOW) from exc
        except aiohttp.ClientError as exc:
            log.info("could not download %r: %s", url, exc)
            raise UserError("I could not download that image: attach it again.") from exc
        raise UserError("I could not download that image: attach it again.")  # too many redirects

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        data = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            data += chunk
            if len(data) > self.max_bytes:
                raise UserError(f"The image is over {_mib(self.max_bytes)}: use a smaller one.")
        return bytes(data)
