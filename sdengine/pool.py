"""Several models behind one executor: which of them are on the device, and bringing one there for a job.

At most `max_loaded` models (0: no limit) stay on the device, the most recently used ones. A model pushed out
goes to CPU memory when the device is a GPU, so coming back is a copy; on a CPU device it is unloaded instead
(keeping it would hold the very memory the limit is there to free) and loaded again from its source.

The executor's worker thread is the only caller once the pool is built; `loaded` may be read from any thread.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import InvalidRequest, ModelLoadError
from .info import ModelInfo, ModelSpec, describe
from .models import Model, load_model

log = logging.getLogger(__name__)


def load_spec(spec: ModelSpec) -> Model:
    return load_model(
        spec.path,
        device=spec.device,
        dtype=spec.dtype,
        safety_checker=spec.safety_checker,
        memory=spec.memory,
        compile=spec.compile,
        loras=spec.loras,
        channels_last=spec.channels_last,
        fuse_qkv=spec.fuse_qkv,
        cuda_graphs=spec.cuda_graphs,
    )


class PoolLoadError(ModelLoadError):
    """Model `name` of a pool did not load; the message is the cause's."""

    def __init__(self, name: str, path: str, cause: BaseException) -> None:
        super().__init__(str(cause).strip() or type(cause).__name__)
        self.name = name
        self.path = path
        self.cause = cause


@dataclass
class _Entry:
    spec: ModelSpec | None  # None: given loaded, so it is never unloaded
    model: Model | None  # None while unloaded
    info: ModelInfo
    on_device: bool = True


class ModelPool:
    """Named models, `default` among them; see the module docstring."""

    def __init__(self, default: str, max_loaded: int = 0) -> None:
        if max_loaded < 0:
            raise ValueError("max_loaded must be 0 (no limit) or more")
        self.default = default
        self.max_loaded = max_loaded
        self._entries: dict[str, _Entry] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()  # on the device, least recently used first
        self._loaded: tuple[str, ...] = ()  # a copy of _recent for other threads: stats() reads it mid-switch
        self._device = torch.device("cpu")  # set by the first model

    @classmethod
    def of(cls, model: Model, name: str | None = None) -> ModelPool:
        """One model, already loaded, under `name` (by default its own)."""
        name = name or model.name
        pool = cls(name)
        pool._entries[name] = _Entry(None, model, describe(model))
        pool._recent[name] = None
        pool._loaded = (name,)
        pool._device = model.device
        return pool

    @classmethod
    def load(cls, specs: Mapping[str, ModelSpec], default: str, max_loaded: int = 0) -> ModelPool:
        """Load every model once, so a bad source fails at start and not on a user's request; the default one
        ends on the device. Raises `PoolLoadError` naming the model that failed."""
        pool = cls(default, max_loaded)
        for name in sorted(specs, key=lambda n: n == default):  # the default last: it stays on the device
            try:
                model = load_spec(specs[name])
            except Exception as err:
                raise PoolLoadError(name, specs[name].path, err) from err
            pool._entries[name] = _Entry(specs[name], model, describe(model))
            pool._recent[name] = None
            pool._loaded = tuple(pool._recent)
            pool._device = model.device
            pool._make_room(keep={name})
        pool._entries = {name: pool._entries[name] for name in specs}  # listed in the config's order
        return pool

    @property
    def device(self) -> torch.device:
        """The device the models run on: the bot's config gives them all one device."""
        return self._device

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def infos(self) -> dict[str, ModelInfo]:
        return {name: entry.info for name, entry in self._entries.items()}

    @property
    def loaded(self) -> list[str]:
        """The models on the device, least recently used first."""
        return list(self._loaded)

    def resolve(self, name: str | None) -> str:
        """The model a request names (None: the default), or `InvalidRequest`."""
        if name is None:
            return self.default
        if name not in self._entries:
            raise InvalidRequest(f"There is no model {name!r} here: pick one of {', '.join(self._entries)}.")
        return name

    def on_device(self, name: str) -> bool:
        return self._entries[name].on_device

    def has_room_for(self, name: str, busy: set[str]) -> bool:
        """Whether `name` can be on the device without pushing out a model in `busy` (ones with running jobs)."""
        if self.max_loaded == 0 or self.on_device(name) or len(self._recent) < self.max_loaded:
            return True
        return any(other not in busy for other in self._recent)

    def acquire(self, name: str, busy: set[str]) -> Model:
        """Model `name` on the device, marked most recently used; pushes out others (never one in `busy`)."""
        entry = self._entries[name]
        if not entry.on_device:
            started = time.monotonic()
            self._make_room(keep=busy | {name}, adding=1)
            assert entry.spec is not None, "a model given loaded is never pushed out"
            if entry.model is None:
                entry.model = load_spec(entry.spec)
            else:
                _place(entry.model, entry.model.device)
            entry.on_device = True
            log.info("model %r is on %s again after %.1f s", name, entry.model.device, time.monotonic() - started)
        self._recent[name] = None
        self._recent.move_to_end(name)
        self._loaded = tuple(self._recent)
        assert entry.model is not None
        return entry.model

    def _make_room(self, keep: set[str], adding: int = 0) -> None:
        """Push out the least recently used models not in `keep` until `adding` more fit under `max_loaded`."""
        if self.max_loaded == 0:
            return
        for name in list(self._recent):
            if len(self._recent) + adding <= self.max_loaded:
                return
            if name not in keep:
                self._push_out(name)

    def _push_out(self, name: str) -> None:
        entry = self._entries[name]
        model = entry.model
        assert model is not None and entry.spec is not None
        started = time.monotonic()
        if model.device.type == "cpu":
            entry.model = None
            how = "unloaded"
        else:
            _place(model, torch.device("cpu"))
            how = "moved to CPU memory"
        del model
        entry.on_device = False
        del self._recent[name]
        self._loaded = tuple(self._recent)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("model %r %s in %.1f s (max_loaded %d)", name, how, time.monotonic() - started, self.max_loaded)


def _place(model: Model, device: torch.device) -> None:
    """Move the model's weights; with `memory = "low"` its text encoders stay on the CPU (sdengine.prompts)."""
    encoders = [] if model.memory == "low" else model.text_encoders
    for module in (model.unet, model.vae, *encoders):
        module.to(device)
    if model.safety_checker is not None:
        model.safety_checker.model.to(device)
