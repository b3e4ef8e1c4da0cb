"""The records of the generation log and its side tables, as plain data: a request to log and a logged generation,
a received command, a blocked user and an admin action. bot/store.py reads and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["imagine", "variation", "reroll"]
Status = Literal["queued", "running", "done", "failed", "cancelled"]
UNFINISHED: tuple[Status, ...] = ("queued", "running")


@dataclass(frozen=True)
class BlockedUser:
    user_id: int
    blocked_by: int
    reason: str
    created_at: float


@dataclass(frozen=True)
class AdminAction:
    id: int
    actor_id: int
    action: str
    target: int | None
    detail: str
    guild_id: int | None
    created_at: float


@dataclass(frozen=True, kw_only=True)
class NewGeneration:
    """What the bot knows about a request when it logs it as queued."""

    kind: Kind
    user_id: int
    channel_id: int
    prompt: str
    negative: str
    scheduler: str
    steps: int
    guidance: float
    model: str
    guild_id: int | None = None
    interaction_id: int | None = None
    source_id: int | None = None  # the interaction or message that asked for it
    width: int | None = None
    height: int | None = None
    count: int = 1
    strength: float | None = None
    seed: int | None = None
    init_image: bytes | None = field(default=None, repr=False)
    parent_id: int | None = None
    hires_scale: float | None = None  # the hires fix; None: none
    hires_strength: float | None = None
    hires_steps: int | None = None  # None: the first pass's steps
    hires_upscaler: str | None = None


@dataclass(frozen=True)
class Generation:
    """One row of the log."""

    id: int
    kind: Kind
    user_id: int
    guild_id: int | None
    channel_id: int
    interaction_id: int | None
    message_id: int | None
    prompt: str
    negative: str
    scheduler: str
    steps: int
    guidance: float
    width: int | None
    height: int | None
    count: int
    strength: float | None
    seed: int | None
    seeds: list[int]
    model: str
    init_image: bytes | None = field(repr=False)
    parent_id: int | None
    status: Status
    reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float]
    notices: list[str]
    attempts: int = 1
    source_id: int | None = None
    image_pruned: bool = False
    hires_scale: float | None = None
    hires_strength: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str | None = None

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED


@dataclass(frozen=True)
class Received:
    """A command, button press or reply the bot acknowledged, noted before its generation row exists."""

    interaction_id: int  # or, for a reply, its message id
    user_id: int
    guild_id: int | None
    channel_id: int
    command: str
    prompt: str
    received_at: float
