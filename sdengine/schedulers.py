"""Scheduler names users know, built fresh per image from the model's own scheduler config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .request import SCHEDULER_LABELS, SCHEDULERS

# name -> (class, overrides of the model's config). A1111 calls dpmpp_2m "DPM++ 2M Karras".
_KINDS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "lms": (LMSDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
}
assert tuple(_KINDS) == SCHEDULERS

# How the PNG `parameters` chunk names each scheduler, as A1111 does: the labels users see.
SAMPLER_NAMES = SCHEDULER_LABELS


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """A new scheduler instance: they keep per-run state (step index, history), so never share one."""
    cls, overrides = _KINDS[name]
    scheduler: SchedulerMixin = cls.from_config(config, **overrides)
    return scheduler
