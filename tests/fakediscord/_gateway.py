"""The gateway: one websocket session at a time, with sequence numbers and RESUME replay.

Frames are plain JSON text. discord.py asks for ``compress=zlib-stream`` in the URL but only
decompresses *binary* frames, so text frames need no compression.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from ._models import JSON

if TYPE_CHECKING:
    from ._fake import FakeDiscord

log = logging.getLogger(__name__)

# Gateway opcodes.
DISPATCH, HEARTBEAT, IDENTIFY, PRESENCE, RESUME, RECONNECT = 0, 1, 2, 3, 6, 7
REQUEST_MEMBERS, INVALID_SESSION, HELLO, HEARTBEAT_ACK = 8, 9, 10, 11


class Gateway:
    """Gateway session state. Dispatches made while no socket is connected are kept and replayed on RESUME."""

    def __init__(self, fake: FakeDiscord, heartbeat_interval: int) -> None:
        self.fake = fake
        self.heartbeat_interval = heartbeat_interval
        self.session_id: str | None = None
        self.seq = 0
        self.frames: list[JSON] = []  # every dispatch of this session, for replay and inspection
        self.identify: JSON | None = None  # the last IDENTIFY "d"
        self.presence: JSON | None = None
        self.connections = 0
        self.identify_count = 0
        self.resume_count = 0
        self.heartbeat_count = 0
        self._ws: web.WebSocketResponse | None = None
        # Open sockets -> their TCP transport (to simulate an abrupt network drop).
        self._sockets: dict[web.WebSocketResponse, asyncio.BaseTransport | None] = {}
        self._lock = asyncio.Lock()  # keeps seq order == wire order

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.connections += 1
        self._sockets[ws] = request.transport
        try:
            await ws.send_json({"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_interval}})
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_frame(ws, json.loads(msg.data))
        finally:
            self._sockets.pop(ws, None)
            if self._ws is ws:
                self._ws = None
            self.fake._changed()
        return ws

    async def _on_frame(self, ws: web.WebSocketResponse, frame: JSON) -> None:
        op = frame.get("op")
        d: Any = frame.get("d")
        if op == HEARTBEAT:
            self.heartbeat_count += 1
            await ws.send_json({"op": HEARTBEAT_ACK})
        elif op == IDENTIFY:
            await self._identify(ws, d)
        elif op == RESUME:
            await self._resume(ws, d)
        elif op == PRESENCE:
            self.presence = d
        elif op == REQUEST_MEMBERS:
            await self.dispatch("GUILD_MEMBERS_CHUNK", self.fake._members_chunk(d))
        else:
            log.warning("fake gateway: unhandled op %s", op)

    async def _identify(self, ws: web.WebSocketResponse, d: JSON) -> None:
        if d.get("token") != self.fake.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        async with self._lock:
            self.identify = d
            self.identify_count += 1
            self.session_id = secrets.token_hex(16)
            self.seq = 0
            self.frames.clear()
            self._ws = ws
        await self.dispatch("READY", self.fake._ready_payload(d))
        for guild in self.fake.guilds:
            await self.dispatch("GUILD_CREATE", guild.to_dict())
        self.fake._ready.set()
        self.fake._changed()

    async def _resume(self, ws: web.WebSocketResponse, d: JSON) -> None:
        if d.get("token") != self.fake.token or d.get("session_id") != self.session_id:
            # Not resumable: the client starts over with IDENTIFY.
            await ws.send_json({"op": INVALID_SESSION, "d": False})
            return
        async with self._lock:
            self.resume_count += 1
            self._ws = ws
            after = d.get("seq") or 0
            for frame in self.frames:
                if frame["s"] > after:
                    await ws.send_json(frame)
        await self.dispatch("RESUMED", {})
        self.fake._changed()

    async def dispatch(self, event: str, data: Any) -> int:
        """Send (or, while disconnected, queue for RESUME) one DISPATCH; returns its sequence number."""
        async with self._lock:
            self.seq += 1
            frame = {"op": DISPATCH, "t": event, "s": self.seq, "d": data}
            self.frames.append(frame)
            ws = self._ws
            if ws is not None and not ws.closed:
                try:
                    await ws.send_json(frame)
                except ConnectionError:
                    log.debug("fake gateway: %s lost in a dropped connection; replayed on RESUME", event)
            return self.seq

    async def drop(self, code: int | None = 4000) -> None:
        """Close the current socket. ``code=None`` aborts the TCP connection without a close frame."""
        ws = self._ws
        self._ws = None
        if ws is None:
            return
        transport = self._sockets.get(ws)
        if code is None and isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            await ws.close(code=4000 if code is None else code)

    async def send_op(self, op: int, d: Any = None) -> None:
        """Send a raw non-dispatch opcode (RECONNECT, INVALID_SESSION...) on the current socket."""
        if self._ws is not None:
            await self._ws.send_json({"op": op, "d": d})

    async def close_all(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001)
