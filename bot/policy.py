"""What this bot allows: the limits, the cooldown and the NSFW rule, each answered with one sentence.

All of it runs in memory, before anything is downloaded or queued, so a refused request costs nothing but its row.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

from PIL import Image

import sdengine
from bot import render
from bot.config import ENGINE_MAX_SIDE, Settings

log = logging.getLogger(__name__)


class Policy:
    """The limits of `settings.limits` (each model's sizes and costs measured against its own native size), the
    per-user cooldown, and whether results are safety-checked."""

    def __init__(self, settings: Settings, models: Mapping[str, sdengine.ModelInfo]) -> None:
        self.settings = settings
        self.models = models  # names and sizes only: on the Ray backend that is all there is
        self._last_submit: dict[int, float] = {}  # user id -> time.monotonic() of their last accepted request

        # The NSFW policy: check results with the model's safety checker (unless configured off), and black out
        # what it flags outside age-restricted channels. Without one, discord.nsfw_channels_only is the only guard.
        checker = settings.safety.checker
        for name, model in models.items():
            if checker == "on" and not model.has_safety_checker:
                raise sdengine.ModelLoadError(
                    f'safety.checker is "on" but the model {name!r} has no safety_checker and feature_extractor '
                    'folders: use a model folder that has them, or set safety.checker to "auto" or "off".'
                )
        if not settings.discord.nsfw_channels_only:
            unchecked = [name for name in models if not self.checks_safety(name)]
            if unchecked:
                log.warning(
                    "no NSFW safety checker runs for %s and discord.nsfw_channels_only is false: "
                    "their results are posted unfiltered in every allowed channel",
                    ", ".join(unchecked),
                )

    def model(self, name: str | None) -> sdengine.ModelInfo:
        """A model by name (None: the default); the caller has resolved the name (`GenerationService.model_name`)."""
        return self.models[name or self.settings.model.label]

    def checks_safety(self, model: str | None) -> bool:
        return self.settings.safety.checker != "off" and self.model(model).has_safety_checker

    def problem(self, request: sdengine.GenerationRequest, user_id: int) -> str | None:
        """Why `request` may not run here, in one sentence; None if it may. An init image not yet fetched is
        costed at the model's native area, which is what `image_size` gives it."""
        model = self.model(request.model)
        try:
            sdengine.check_for_model(model, request)
        except sdengine.InvalidRequest as exc:
            return str(exc)
        limits = self.settings.limits
        max_side, max_cost = self.size_limits(request.model)
        if request.steps > limits.max_steps:
            return f"Steps can be at most {limits.max_steps} here, not {request.steps}."
        if request.count > limits.max_count:
            return f"At most {limits.max_count} images per request here, not {request.count}."
        for name, side in (("width", request.width), ("height", request.height)):
            if side is not None and side > max_side:
                return f"The {name} can be at most {max_side} pixels here, not {side}."
        return self._work_problem(request, model, max_side, max_cost) or self.cooldown(user_id)

    def _work_problem(
        self, request: sdengine.GenerationRequest, model: sdengine.ModelInfo, max_side: int, max_cost: int
    ) -> str | None:
        """Why `request` is too much work here (pixels times steps of every image and pass), or None."""
        width = request.width or model.native_size
        height = request.height or model.native_size
        work = width * height * request.steps
        images = "1 image" if request.count == 1 else f"{request.count} images"
        if request.hires_scale is None:
            if work * request.count > max_cost:
                return (
                    f"{images} of {width}x{height} at {request.steps} steps is more work than allowed here: "
                    "lower the steps, the size or the count."
                )
            return None
        # The hires fix: its output size within max_side, and both of its passes within max_cost.
        scale = request.hires_scale
        big_width, big_height = sdengine.hires_size(width, height, scale, model.latent_factor)
        if max(big_width, big_height) > max_side:
            return (
                f"Hires {scale:g}x of {width}x{height} makes {big_width}x{big_height}, over the {max_side} pixels a "
                "side allowed here: lower the size or the hires scale."
            )
        work += big_width * big_height * sdengine.hires_steps_run(request)
        if work * request.count > max_cost:
            return (
                f"{images} of {width}x{height} at {request.steps} steps, with hires {scale:g}x to "
                f"{big_width}x{big_height}, is more work than allowed here: lower the steps, the size, the count "
                "or the hires scale."
            )
        return None

    def image_size(self, width: int, height: int, model: str | None) -> tuple[int, int]:
        """The size to draw an init image's variation at: its aspect ratio at about the model's native area, in
        the model's size steps, shrunk to fit `limits.max_side`."""
        info = self.model(model)
        step = 8 * info.latent_factor
        return render.fit_aspect(width / height, info.native_size, step, self.size_limits(model)[0])

    def size_limits(self, model: str | None) -> tuple[int, int]:
        """`max_side` and `max_cost` for a model: its own, or `[limits]` (meant for 512² models) scaled to its native
        size, so that an SDXL model gets its 1024² pictures under the limits a 512² model has."""
        info = self.model(model)
        settings = self.settings.model_named(model or self.settings.model.label)
        scale = max(1.0, info.native_size / 512)
        max_side = settings.max_side or min(ENGINE_MAX_SIDE, round(self.settings.limits.max_side * scale))
        return max_side, settings.max_cost or round(self.settings.limits.max_cost * scale**2)

    def cooldown(self, user_id: int) -> str | None:
        """The cooldown sentence while the user must still wait after their last accepted request, else None."""
        wait = self._last_submit.get(user_id, -math.inf) + self.settings.limits.cooldown_seconds - time.monotonic()
        if wait > 0:
            return f"You are on cooldown: try again in {math.ceil(wait)} s."
        return None

    def accepted(self, user_id: int) -> None:
        """A request of `user_id` was queued: their cooldown starts now."""
        self._last_submit[user_id] = time.monotonic()


def black_out_flagged(result: sdengine.GenerationResult) -> tuple[list[Image.Image], list[bytes], list[str]]:
    """The result's images and PNGs with those the safety checker flagged replaced by black, and a note that says so.

    The engine only flags; it ran the checker only where the destination is not age-restricted."""
    flagged = [i for i, flag in enumerate(result.nsfw) if flag]
    if not flagged:
        return list(result.images), list(result.pngs), []
    images, pngs = list(result.images), list(result.pngs)
    for i in flagged:
        images[i] = Image.new("RGB", images[i].size)  # black; the message and the row keep the parameters
        pngs[i] = render.png(images[i])
    return images, pngs, [_flagged_note(flagged, len(images))]


def _flagged_note(flagged: Sequence[int], count: int) -> str:
    numbers = ", ".join(str(i + 1) for i in flagged)
    if count == 1:
        subject = "The image was"
    elif len(flagged) == 1:
        subject = f"Image {numbers} of {count} was"
    else:
        subject = f"Images {numbers} of {count} were"
    return (
        f"{subject} flagged as NSFW by the safety checker and blacked out: "
        "such results only show in age-restricted channels."
    )
