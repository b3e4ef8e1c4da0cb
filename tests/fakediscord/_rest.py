"""The REST half: request log, fault injection, auth, and one handler per Discord route the bot uses.

Handlers parse HTTP and delegate state changes to ``FakeDiscord``. Errors are raised as ``ApiError``
and rendered the way Discord renders them, so discord.py raises the same exception types it would
against the real API.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._models import JSON, FakeChannel, FakeInteraction, FakeMessage, RequestRecord, UploadedFile

if TYPE_CHECKING:
    from ._fake import FakeDiscord

API_PREFIX = "/api/v10"
RECORD = web.RequestKey("record", RequestRecord)  # the middleware's log entry, for handlers


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """discord.py only parses bodies whose content-type is *exactly* ``application/json``
    (``web.json_response`` appends ``; charset=utf-8``)."""
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def no_content() -> web.Response:
    return web.Response(status=204)


class ApiError(Exception):
    """A Discord-style error: ``{"code": ..., "message": ...}`` with an HTTP status."""

    def __init__(
        self, status: int, code: int, message: str, *, errors: JSON | None = None, body: JSON | None = None
    ) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.body: JSON = body if body is not None else {"code": code, "message": message}
        if errors is not None:
            self.body["errors"] = errors

    def response(self) -> web.Response:
        return json_response(self.body, self.status)


def unknown_message() -> ApiError:
    return ApiError(404, 10008, "Unknown Message")


def unknown_channel() -> ApiError:
    return ApiError(404, 10003, "Unknown Channel")


def form_error(field: str, code: str, message: str) -> ApiError:
    errors = {field: {"_errors": [{"code": code, "message": message}]}}
    return ApiError(400, 50035, "Invalid Form Body", errors=errors)


DEFAULT_ERRORS: dict[int, tuple[int, str]] = {
    400: (50035, "Invalid Form Body"),
    401: (0, "401: Unauthorized"),
    403: (50013, "Missing Permissions"),
    404: (10008, "Unknown Message"),
}


RESET = 0  # a Fault status that drops the connection instead of answering


@dataclass(eq=False)
class Fault:
    """A pending injected failure; see ``FakeDiscord.fail_next``. ``hits`` counts how often it fired."""

    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    json: JSON | None
    retry_after: float | None
    hits: int = 0

    def matches(self, record: RequestRecord) -> bool:
        return (
            self.hits < self.times
            and self.method in ("*", record.method)
            and self.pattern.search(record.path) is not None
        )

    def response(self) -> web.Response:
        self.hits += 1
        if self.status == 429:
            body = self.json or {"message": "You are being rate limited.", "global": False}
            retry_after = float(body.get("retry_after", self.retry_after or 0.1))
            body = {**body, "retry_after": retry_after}
            headers = {
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                "X-RateLimit-Bucket": "fakebucket",
                "X-RateLimit-Scope": "shared" if not body.get("global") else "global",
                "Retry-After": f"{retry_after:.3f}",
                # discord.py treats a 429 without `Via` as a Cloudflare ban and does not retry.
                "Via": "1.1 google",
            }
            if body.get("global"):
                headers["X-RateLimit-Global"] = "true"
            return json_response(body, 429, headers)
        if self.json is not None:
            return json_response(self.json, self.status)
        code, message = DEFAULT_ERRORS.get(self.status, (0, f"{self.status}: Server Error"))
        return json_response({"code": code, "message": message}, self.status)


def _snowflake(request: web.Request, key: str) -> int:
    try:
        return int(request.match_info[key])
    except ValueError:
        raise ApiError(400, 50035, "Invalid Form Body") from None


class RestApi:
    """Routes and bookkeeping for the HTTP API. ``requests`` is the log tests assert on."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self.expired_tokens: set[str] = set()

    # -- plumbing ----------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        p = API_PREFIX
        r = app.router
        r.add_get(p + "/gateway", self.gateway)
        r.add_get(p + "/gateway/bot", self.gateway)
        r.add_get(p + "/users/@me", self.get_me)
        r.add_post(p + "/users/@me/channels", self.create_dm)
        r.add_get(p + "/users/{user_id}", self.get_user)
        r.add_get(p + "/oauth2/applications/@me", self.application_info)
        r.add_get(p + "/applications/@me", self.application_info)
        r.add_get(p + "/applications/{app_id}/commands", self.get_commands)
        r.add_put(p + "/applications/{app_id}/commands", self.put_commands)
        r.add_get(p + "/applications/{app_id}/guilds/{guild_id}/commands", self.get_commands)
        r.add_put(p + "/applications/{app_id}/guilds/{guild_id}/commands", self.put_commands)
        r.add_post(p + "/interactions/{interaction_id}/{token}/callback", self.interaction_callback)
        r.add_post(p + "/webhooks/{app_id}/{token}", self.webhook_execute)
        r.add_route("*", p + "/webhooks/{app_id}/{token}/messages/{message_id}", self.webhook_message)
        r.add_get(p + "/channels/{channel_id}", self.get_channel)
        r.add_get(p + "/channels/{channel_id}/messages", self.channel_history)
        r.add_post(p + "/channels/{channel_id}/messages", self.create_message)
        message = p + "/channels/{channel_id}/messages/{message_id}"
        r.add_route("*", message, self.channel_message)
        r.add_route("*", message + "/reactions/{emoji}/@me", self.reaction)
        r.add_post(p + "/channels/{channel_id}/typing", self.typing)
        r.add_get(p + "/guilds/{guild_id}", self.get_guild)
        r.add_get(p + "/guilds/{guild_id}/members/{user_id}", self.get_member)
        r.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self.attachment)
        r.add_route("*", "/{tail:.*}", self.unhandled)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/":  # the gateway websocket: not a REST call
            response: web.StreamResponse = await handler(request)
            return response
        record = await self._record(request)
        request[RECORD] = record
        self.requests.append(record)
        try:
            fault = next((f for f in self.faults if f.matches(record)), None)
            if fault is not None and fault.status == RESET:
                fault.hits += 1
                record.status = RESET
                self.fake._changed()
                if request.transport is not None:
                    request.transport.close()  # the connection drops: the client sees it reset, with no answer
                raise web.HTTPServiceUnavailable()  # never sent: the connection is gone
            if fault is not None:
                response = fault.response()
            else:
                self._check_auth(request, record)
                response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        record.status = response.status
        self.fake._changed()
        return response

    async def _record(self, request: web.Request) -> RequestRecord:
        body: Any = None
        files: list[UploadedFile] = []
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            for name, value in form.items():
                if isinstance(value, web.FileField):
                    files.append(UploadedFile(name, value.filename, value.content_type, value.file.read()))
                elif name == "payload_json":
                    body = json.loads(value)
        elif request.can_read_body:
            raw = await request.read()
            if raw:
                body = json.loads(raw)
        path = request.path
        path = path[len(API_PREFIX) :] if path.startswith(API_PREFIX) else path
        return RequestRecord(
            method=request.method,
            path=path,
            query=dict(request.query),
            headers=dict(request.headers),
            json=body,
            files=files,
            at=time.monotonic(),
        )

    def _check_auth(self, request: web.Request, record: RequestRecord) -> None:
        """Bot-authenticated routes only; webhooks, interaction callbacks and the CDN take no token."""
        if record.path.startswith(("/webhooks/", "/interactions/", "/attachments/")):
            return
        if not request.path.startswith(API_PREFIX):
            return
        if request.headers.get("Authorization") != f"Bot {self.fake.token}":
            raise ApiError(401, 0, "401: Unauthorized")

    @staticmethod
    def _body(request: web.Request) -> tuple[JSON, list[UploadedFile]]:
        record: RequestRecord = request[RECORD]
        return (record.json or {}), record.files

    # -- meta ----------------------------------------------------------------------------------

    async def gateway(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self.fake.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def get_me(self, request: web.Request) -> web.Response:
        return json_response(self.fake._bot_user_payload())

    async def get_user(self, request: web.Request) -> web.Response:
        user = self.fake.users.get(_snowflake(request, "user_id"))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return json_response(user.to_dict())

    async def create_dm(self, request: web.Request) -> web.Response:
        body, _ = self._body(request)
        user = self.fake.users.get(int(body.get("recipient_id", 0)))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return json_response(self.fake.dm_channel(user).to_dict())

    async def application_info(self, request: web.Request) -> web.Response:
        return json_response(self.fake._application_payload())

    async def get_guild(self, request: web.Request) -> web.Response:
        gid = _snowflake(request, "guild_id")
        guild = next((g for g in self.fake.guilds if g.id == gid), None)
        if guild is None:
            raise ApiError(404, 10004, "Unknown Guild")
        data = guild.to_dict()
        for key in ("members", "channels", "threads", "presences", "voice_states", "joined_at"):
            data.pop(key)
        return json_response(data)

    async def get_member(self, request: web.Request) -> web.Response:
        gid, uid = _snowflake(request, "guild_id"), _snowflake(request, "user_id")
        guild = next((g for g in self.fake.guilds if g.id == gid), None)
        member = next((m for m in guild.members if m.user.id == uid), None) if guild else None
        if member is None:
            raise ApiError(404, 10007, "Unknown Member")
        return json_response(member.to_dict())

    # -- application commands ---------------------------------------------------------------------

    def _check_app(self, request: web.Request) -> None:
        if _snowflake(request, "app_id") != self.fake.app_id:
            raise ApiError(403, 50001, "Missing Access")

    async def get_commands(self, request: web.Request) -> web.Response:
        self._check_app(request)
        gid = int(request.match_info["guild_id"]) if "guild_id" in request.match_info else None
        return json_response(self.fake.commands.get(gid, []))

    async def put_commands(self, request: web.Request) -> web.Response:
        self._check_app(request)
        gid = int(request.match_info["guild_id"]) if "guild_id" in request.match_info else None
        body = request[RECORD].json or []
        return json_response(self.fake._sync_commands(gid, body))

    # -- interactions and their webhooks ------------------------------------------------------

    async def interaction_callback(self, request: web.Request) -> web.Response:
        inter = self.fake._interactions_by_token.get(request.match_info["token"])
        if inter is None or inter.id != _snowflake(request, "interaction_id"):
            raise ApiError(404, 10062, "Unknown interaction")
        body, files = self._body(request)
        result = await self.fake._interaction_callback(inter, body, files)
        if request.query.get("with_response") in ("1", "true", "True"):
            return json_response(result)
        return no_content()

    def _webhook_interaction(self, request: web.Request) -> FakeInteraction:
        token = request.match_info["token"]
        inter = self.fake._interactions_by_token.get(token)
        if inter is None or _snowflake(request, "app_id") != self.fake.app_id:
            raise ApiError(404, 10015, "Unknown Webhook")
        if token in self.expired_tokens:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return inter

    async def webhook_execute(self, request: web.Request) -> web.Response:
        inter = self._webhook_interaction(request)
        body, files = self._body(request)
        message = await self.fake._followup(inter, body, files)
        if request.query.get("wait") in ("0", "false", "False"):
            return no_content()
        return json_response(self.fake.message_payload(message))

    async def webhook_message(self, request: web.Request) -> web.StreamResponse:
        inter = self._webhook_interaction(request)
        mid = request.match_info["message_id"]
        message = inter.original if mid == "@original" else next((m for m in inter.messages if str(m.id) == mid), None)
        if message is None or message.deleted:
            raise unknown_message()
        return await self._message_method(request, message)

    # -- channels and messages ------------------------------------------------------------------

    def _channel(self, request: web.Request) -> FakeChannel:
        channel = self.fake.channels.get(_snowflake(request, "channel_id"))
        if channel is None:
            raise unknown_channel()
        return channel

    def _message(self, request: web.Request) -> FakeMessage:
        channel = self._channel(request)
        mid = _snowflake(request, "message_id")
        message = next((m for m in self.fake.messages if m.id == mid and m.channel_id == channel.id), None)
        if message is None or message.deleted or message.ephemeral:
            raise unknown_message()
        return message

    async def _message_method(self, request: web.Request, message: FakeMessage) -> web.StreamResponse:
        if request.method == "GET":
            return json_response(self.fake.message_payload(message, redact=True))
        if request.method == "PATCH":
            body, files = self._body(request)
            await self.fake._edit_message(message, body, files)
            return json_response(self.fake.message_payload(message))
        if request.method == "DELETE":
            await self.fake._delete_message(message)
            return no_content()
        raise ApiError(405, 0, "405: Method Not Allowed")

    async def get_channel(self, request: web.Request) -> web.Response:
        return json_response(self._channel(request).to_dict())

    async def channel_history(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        limit = min(int(request.query.get("limit", 50)), 100)
        before = int(request.query.get("before", 1 << 63))
        after = int(request.query.get("after", 0))
        found = [
            m
            for m in self.fake.messages
            if m.channel_id == channel.id and not m.deleted and not m.ephemeral and after < m.id < before
        ]
        found.sort(key=lambda m: m.id, reverse=True)
        if "after" in request.query:  # Discord pages forward from `after`: oldest first, then newest-first
            found = sorted(found, key=lambda m: m.id)[:limit][::-1]
        return json_response([self.fake.message_payload(m, redact=True) for m in found[:limit]])

    async def create_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        body, files = self._body(request)
        message = await self.fake._bot_channel_message(channel, body, files)
        return json_response(self.fake.message_payload(message, redact=True))

    async def channel_message(self, request: web.Request) -> web.StreamResponse:
        return await self._message_method(request, self._message(request))

    async def reaction(self, request: web.Request) -> web.Response:
        message = self._message(request)
        emoji = request.match_info["emoji"]
        if request.method == "PUT" and emoji not in message.reactions:
            message.reactions.append(emoji)
        elif request.method == "DELETE" and emoji in message.reactions:
            message.reactions.remove(emoji)
        return no_content()

    async def typing(self, request: web.Request) -> web.Response:
        self._channel(request)
        return no_content()

    # -- CDN and fallbacks ----------------------------------------------------------------------

    async def attachment(self, request: web.Request) -> web.Response:
        att = self.fake.attachments.get(_snowflake(request, "attachment_id"))
        if att is None or att.filename != request.match_info["filename"]:
            return web.Response(status=404, text="Not Found")
        content_type = att.content_type or "application/octet-stream"
        return web.Response(body=att.data, headers={"Content-Type": content_type})

    async def unhandled(self, request: web.Request) -> web.Response:
        request[RECORD].unhandled = True
        return json_response({"code": 0, "message": "404: Not Found"}, 404)
