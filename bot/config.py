"""Bot settings: a TOML file read into typed, validated, frozen dataclasses.

Every key is optional, so an empty file is a valid config. Anything wrong (a typo in a key, a wrong type, a value out
of range) raises `ConfigError` with one line that names the key and says what is allowed.
The bot token is never stored here: `Settings.token()` reads it from the environment when the bot starts.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Mirrors sdengine's limits; copied rather than imported because importing sdengine loads torch.
SCHEDULERS = ("lms", "ddim", "euler", "euler_a", "dpmpp_2m")
ENGINE_MAX_STEPS = 150
ENGINE_MAX_SIDE = 2048
ENGINE_MAX_COUNT = 4
ENGINE_MAX_GUIDANCE = 30.0
ENGINE_MAX_PROMPT_CHARS = 2000

SECTIONS = ("discord", "model", "storage", "defaults", "limits", "safety", "executor")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "fp32", "fp16", "bf16")
MEMORY_MODES = ("auto", "fast", "low")
CHECKERS = ("auto", "on", "off")
BACKENDS = ("local", "ray")
RAY_ADDRESSES = ("auto", "local", "ray://HOST:PORT", "HOST:PORT")
MAX_ID = 2**63 - 1  # Discord snowflakes fit a signed 64-bit int, as do TOML integers


class ConfigError(Exception):
    """The config file or the environment is unusable; the message is one line that says what to change."""


@dataclass(frozen=True)
class DiscordSettings:
    token_env: str = "DISCORD_TOKEN"  # the name of the variable, never the token itself
    guild_ids: tuple[int, ...] = ()  # sync commands to these guilds only (instant); empty: global sync
    allowed_guild_ids: tuple[int, ...] = ()  # empty: every guild
    allowed_channel_ids: tuple[int, ...] = ()  # empty: every channel
    owner_ids: tuple[int, ...] = ()  # bot admins besides members with the Administrator permission
    nsfw_channels_only: bool = False  # post results only in age-restricted channels
    # The privileged Message Content intent, which the bot must also be granted in the developer portal: with it,
    # replies to other people's images work too (without it, Discord blanks their attachments for the bot).
    message_content: bool = False


@dataclass(frozen=True)
class ModelSettings:
    path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, diffusers folder, .safetensors or "tiny"
    device: str = "auto"
    dtype: str = "auto"
    memory: str = "auto"  # "fast", "low" (small GPUs) or "auto" (picked from free GPU memory)
    compile: bool = False  # torch.compile the UNet and the VAE decoder, warmed up at start


@dataclass(frozen=True)
class StorageSettings:
    database: Path = Path("sdbot.sqlite3")  # relative to the working directory
    # Retention of the init images kept for rerolls of variations (the rows stay): 0 turns a rule off.
    keep_init_images_days: float = 30.0
    max_init_images_mib: int = 1024


@dataclass(frozen=True)
class DefaultSettings:
    steps: int = 25
    guidance: float = 7.5
    scheduler: str = "dpmpp_2m"
    negative: str = ""
    strength: float = 0.75  # for variations: how far to move away from the init image


@dataclass(frozen=True)
class LimitSettings:
    max_pending_per_user: int = 3
    max_queue: int = 50
    max_steps: int = 50
    max_side: int = 768  # pixels, per side
    max_count: int = 4
    cooldown_seconds: float = 0.0  # 0: no cooldown
    max_cost: int = 512 * 512 * 50 * 4  # width * height * steps * count
    job_timeout_seconds: float = 600.0
    max_batch: int = 0  # images per UNet call; 0: the engine's default for the device
    max_image_bytes: int = 10 * 1024 * 1024  # attachments above this are refused before download


@dataclass(frozen=True)
class SafetySettings:
    # The NSFW safety checker in the model folder: "auto" uses it when the folder has one, "on" refuses to start
    # without it, "off" never runs it. Flagged images are blacked out outside age-restricted channels.
    checker: str = "auto"


@dataclass(frozen=True)
class RaySettings:
    address: str = "auto"  # "auto": the cluster this machine is part of; "local": start one here; "ray://HOST:PORT"
    workers: int = 0  # workers to start; 0: one per GPU of the cluster
    gpus_per_worker: float = 1.0  # 0 on a CPU-only cluster (then workers must be set)


@dataclass(frozen=True)
class ExecutorSettings:
    backend: str = "local"  # "local": the model runs in the bot's process; "ray": on the workers of a Ray cluster
    ray: RaySettings = field(default_factory=RaySettings)


@dataclass(frozen=True)
class Settings:
    discord: DiscordSettings = field(default_factory=DiscordSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    defaults: DefaultSettings = field(default_factory=DefaultSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)

    def token(self, env: Mapping[str, str] = os.environ) -> str:
        """The bot token from the environment variable named by `discord.token_env`."""
        name = self.discord.token_env
        value = env.get(name, "").strip()
        if not value:
            raise ConfigError(f"{name} is not set: export your bot token in it")
        return value


def load_settings(path: str | Path) -> Settings:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found: copy config.example.toml and edit it") from None
    except tomllib.TOMLDecodeError as err:
        # The message ends with "(at line L, column C)".
        raise ConfigError(f"config file '{path}' is not valid TOML: {_one_line(str(err))}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not valid TOML: it must be UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read: {_one_line(err.strerror or str(err))}") from None
    return parse_settings(data)


def parse_settings(data: Mapping[str, Any]) -> Settings:
    """Validate an already parsed TOML document."""
    for key in data:
        if key not in SECTIONS:
            where = ", ".join(f"[{name}]" for name in SECTIONS)
            raise ConfigError(f"{key}: unknown key at the top level{_suggest(key, set(SECTIONS))}; use {where}")

    discord = _Section("discord", data)
    model = _Section("model", data)
    storage = _Section("storage", data)
    defaults = _Section("defaults", data)
    limits = _Section("limits", data)
    safety = _Section("safety", data)
    executor = _Section("executor", data)
    ray = executor.table_section("ray")

    limit_settings = LimitSettings(
        max_pending_per_user=limits.integer("max_pending_per_user", LimitSettings.max_pending_per_user, 1, 1000),
        max_queue=limits.integer("max_queue", LimitSettings.max_queue, 1, 100_000),
        max_steps=limits.integer("max_steps", LimitSettings.max_steps, 1, ENGINE_MAX_STEPS),
        max_side=limits.integer("max_side", LimitSettings.max_side, 64, ENGINE_MAX_SIDE),
        max_count=limits.integer("max_count", LimitSettings.max_count, 1, ENGINE_MAX_COUNT),
        cooldown_seconds=limits.number("cooldown_seconds", LimitSettings.cooldown_seconds, 0.0, 86_400.0),
        max_cost=limits.integer("max_cost", LimitSettings.max_cost, 1, MAX_ID),
        job_timeout_seconds=limits.number(
            "job_timeout_seconds", LimitSettings.job_timeout_seconds, 0.0, 86_400.0, low_open=True
        ),
        max_batch=limits.integer("max_batch", LimitSettings.max_batch, 0, 64),
        max_image_bytes=limits.integer("max_image_bytes", LimitSettings.max_image_bytes, 1, 2**31 - 1),
    )
    max_steps = limit_settings.max_steps
    # Lowering max_steps alone also lowers the default steps; an explicit defaults.steps above it is an error.
    default_steps = defaults.integer("steps", min(DefaultSettings.steps, max_steps), 1, ENGINE_MAX_STEPS)
    if default_steps > max_steps:
        raise ConfigError(f"defaults.steps: must be at most limits.max_steps ({max_steps}), not {default_steps}")

    settings = Settings(
        discord=DiscordSettings(
            token_env=discord.env_name("token_env", DiscordSettings.token_env),
            guild_ids=discord.ids("guild_ids"),
            allowed_guild_ids=discord.ids("allowed_guild_ids"),
            allowed_channel_ids=discord.ids("allowed_channel_ids"),
            owner_ids=discord.ids("owner_ids"),
            nsfw_channels_only=discord.flag("nsfw_channels_only", DiscordSettings.nsfw_channels_only),
            message_content=discord.flag("message_content", DiscordSettings.message_content),
        ),
        model=ModelSettings(
            path=model.text("path", ModelSettings.path, allow_empty=False),
            device=model.device("device", ModelSettings.device),
            dtype=model.choice("dtype", ModelSettings.dtype, DTYPES),
            memory=model.choice("memory", ModelSettings.memory, MEMORY_MODES),
            compile=model.flag("compile", ModelSettings.compile),
        ),
        storage=StorageSettings(
            database=Path(storage.text("database", str(StorageSettings.database), allow_empty=False)),
            keep_init_images_days=storage.number(
                "keep_init_images_days", StorageSettings.keep_init_images_days, 0.0, 36_500.0
            ),
            max_init_images_mib=storage.integer(
                "max_init_images_mib", StorageSettings.max_init_images_mib, 0, 1024 * 1024
            ),
        ),
        defaults=DefaultSettings(
            steps=default_steps,
            guidance=defaults.number("guidance", DefaultSettings.guidance, 0.0, ENGINE_MAX_GUIDANCE),
            scheduler=defaults.choice("scheduler", DefaultSettings.scheduler, SCHEDULERS),
            negative=defaults.text("negative", DefaultSettings.negative, max_chars=ENGINE_MAX_PROMPT_CHARS),
            strength=defaults.number("strength", DefaultSettings.strength, 0.0, 1.0, low_open=True),
        ),
        limits=limit_settings,
        safety=SafetySettings(checker=safety.choice("checker", SafetySettings.checker, CHECKERS)),
        executor=_executor_settings(executor, ray),
    )
    for section in (discord, model, storage, defaults, limits, safety, executor, ray):
        section.check_unknown()
    return settings


def _executor_settings(executor: _Section, ray: _Section) -> ExecutorSettings:
    settings = ExecutorSettings(
        backend=executor.choice("backend", ExecutorSettings.backend, BACKENDS),
        ray=RaySettings(
            address=ray.ray_address("address", RaySettings.address),
            workers=ray.integer("workers", RaySettings.workers, 0, 1024),
            gpus_per_worker=ray.number("gpus_per_worker", RaySettings.gpus_per_worker, 0.0, 64.0),
        ),
    )
    if settings.ray.workers == 0 and settings.ray.gpus_per_worker == 0:
        raise ConfigError(
            "executor.ray.workers: must be at least 1 when executor.ray.gpus_per_worker is 0 "
            "(0 starts one worker per GPU, and CPU workers use none), not 0"
        )
    return settings


class _Section:
    """One [table] of the file; each reader checks one key's type and range and records it as known."""

    def __init__(self, name: str, data: Mapping[str, Any], *, key: str | None = None) -> None:
        key = key or name
        table = data.get(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table ([{name}]), not {_show(table)}")
        self.name = name
        self.table: dict[str, Any] = table
        self.known: set[str] = set()

    def table_section(self, key: str) -> _Section:
        """The sub-table [NAME.KEY]."""
        self.known.add(key)
        return _Section(f"{self.name}.{key}", self.table, key=key)

    def _get(self, key: str) -> Any:
        self.known.add(key)
        return self.table.get(key)

    def _fail(self, key: str, allowed: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.name}.{key}: must be {allowed}, not {_show(value)}")

    def check_unknown(self) -> None:
        for key in self.table:
            if key not in self.known:
                raise ConfigError(
                    f"{self.name}.{key}: unknown key{_suggest(key, self.known)}; "
                    f"[{self.name}] takes {_names(self.known)}"
                )

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        # bool is a subclass of int in Python, but `true` is no number in a config file.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._fail(key, f"an integer from {low} to {high}", value)
        return value

    def number(self, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
        value = self._get(key)
        if value is None:
            return default
        bounds = f"above {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"a number {bounds}", value)
        number = float(value)
        # Comparisons with nan are false, so nan (valid TOML) fails the range check; inf fails isfinite.
        in_range = low < number <= high if low_open else low <= number <= high
        if not in_range or not math.isfinite(number):
            raise self._fail(key, f"a number {bounds}", value)
        return number

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def text(self, key: str, default: str, *, allow_empty: bool = True, max_chars: int = 4096) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or "\x00" in value or len(value) > max_chars:
            raise self._fail(key, f"a string of at most {max_chars} characters without NUL", value)
        if not allow_empty and not value.strip():
            raise self._fail(key, "a non-empty string", value)
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self._get(key)
        if value is None:
            return default
        if value not in allowed:
            raise self._fail(key, f"one of {_names(allowed)}", value)
        assert isinstance(value, str)
        return value

    def device(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", value):
            raise self._fail(key, f"one of {_names(DEVICES)}", value)
        return value

    def ray_address(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        host_port = r"[A-Za-z0-9.\-]+:([0-9]{1,5})"
        match = re.fullmatch(rf"auto|local|(?:ray://)?{host_port}", value) if isinstance(value, str) else None
        if match is None or (match.group(1) is not None and not 1 <= int(match.group(1)) <= 65535):
            raise self._fail(key, f"one of {_names(RAY_ADDRESSES)}", value)
        return str(value)

    def env_name(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            # Never echo the value: a common mistake is to paste the token itself here.
            raise ConfigError(
                f"{self.name}.{key}: must be the name of an environment variable, like DISCORD_TOKEN; "
                "put the token itself in that variable, never in this file"
            )
        return value

    def ids(self, key: str) -> tuple[int, ...]:
        value = self._get(key)
        if value is None:
            return ()
        allowed = "a list of Discord IDs (positive integers), like [123456789012345678]"
        if not isinstance(value, list):
            raise self._fail(key, allowed, value)
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= MAX_ID:
                raise self._fail(key, allowed, item)
        return tuple(value)


def _show(value: Any) -> str:
    """A value as it looks in TOML, kept short so the error stays one readable line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = repr(value)  # repr escapes newlines in strings
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _names(names: set[str] | tuple[str, ...]) -> str:
    ordered = names if isinstance(names, tuple) else sorted(names)
    return ", ".join(ordered)


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
