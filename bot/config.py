"""Bot settings: a TOML file read into typed, validated, frozen dataclasses.

Every key is optional, so an empty file is a valid config. Anything wrong (a typo in a key, a wrong type, a value out
of range) raises `ConfigError` with one line that names the key and says what is allowed.
The bot token is never stored here: `Settings.token()` reads it from the environment when the bot starts.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bot.config_reader import DEVICES as DEVICES  # re-exported, as are the two below
from bot.config_reader import MAX_ID as MAX_ID
from bot.config_reader import ConfigError as ConfigError
from bot.config_reader import Section, one_line, show, suggest

# Mirrors sdengine's limits; copied rather than imported because importing sdengine loads torch.
SCHEDULERS = ("lms", "ddim", "euler", "euler_a", "dpmpp_2m")
ENGINE_MAX_STEPS = 150
ENGINE_MAX_SIDE = 2048
ENGINE_MAX_COUNT = 4
ENGINE_MAX_GUIDANCE = 30.0
ENGINE_MAX_PROMPT_CHARS = 2000
HIRES_UPSCALERS = ("latent", "lanczos")
ENGINE_MAX_HIRES_SCALE = 4.0

SECTIONS = ("discord", "model", "models", "storage", "defaults", "limits", "safety", "executor")
DTYPES = ("auto", "fp32", "fp16", "bf16")
MEMORY_MODES = ("auto", "fast", "low")
CHECKERS = ("auto", "on", "off")
BACKENDS = ("local", "ray")
MAX_MODELS = 25  # what a Discord autocomplete list shows
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


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
    cuda_graphs: bool = True  # with compile on CUDA: the UNet replays CUDA graphs
    loras: str = ""  # a folder of LoRA .safetensors files, each an adapter named by its file stem; "" for none
    # Kernel settings (sdengine.kernels): true, false or "auto" (None here), which turns them on for CUDA only
    channels_last: bool | None = None
    fuse_qkv: bool | None = None
    name: str = ""  # NAME of a [models.NAME] table; empty for a lone [model]
    # This model's own limits; 0: [limits] max_side and max_cost, which are meant for a 512² model, scaled up for a
    # model with a larger native size (an SDXL model gets twice the side and four times the cost).
    max_side: int = 0
    max_cost: int = 0

    @property
    def label(self) -> str:
        """What users pick it by and the history records: the table's name, or a lone [model]'s path (so the rows
        of a bot that grew from one model to several still find theirs)."""
        return self.name or self.path


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
    hires_strength: float = 0.5  # the hires fix's image-to-image pass (A1111's default)
    hires_upscaler: str = "latent"
    upscale: float = 2.0  # the hires scale of the Upscale buttons


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
    max_loaded: int = 0  # models kept on the device at once, the most recently used; 0: all of them


@dataclass(frozen=True)
class Settings:
    discord: DiscordSettings = field(default_factory=DiscordSettings)
    model: ModelSettings = field(default_factory=ModelSettings)  # the default model
    models: tuple[ModelSettings, ...] = ()  # every [models.NAME] table, the default among them; empty: `model` alone
    storage: StorageSettings = field(default_factory=StorageSettings)
    defaults: DefaultSettings = field(default_factory=DefaultSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)

    @property
    def all_models(self) -> tuple[ModelSettings, ...]:
        return self.models or (self.model,)

    def model_named(self, label: str) -> ModelSettings:
        return next(m for m in self.all_models if m.label == label)

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
        raise ConfigError(f"config file '{path}' is not valid TOML: {one_line(str(err))}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not valid TOML: it must be UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read: {one_line(err.strerror or str(err))}") from None
    return parse_settings(data)


def parse_settings(data: Mapping[str, Any]) -> Settings:
    """Validate an already parsed TOML document."""
    for key in data:
        if key not in SECTIONS:
            where = ", ".join(f"[{name}]" for name in SECTIONS)
            raise ConfigError(f"{key}: unknown key at the top level{suggest(key, set(SECTIONS))}; use {where}")

    discord = Section("discord", data)
    model = Section("model", data)
    models = _model_tables(data)
    storage = Section("storage", data)
    defaults = Section("defaults", data)
    limits = Section("limits", data)
    safety = Section("safety", data)
    executor = Section("executor", data)
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
        model=_model_settings(model),
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
            hires_strength=defaults.number("hires_strength", DefaultSettings.hires_strength, 0.0, 1.0, low_open=True),
            hires_upscaler=defaults.choice("hires_upscaler", DefaultSettings.hires_upscaler, HIRES_UPSCALERS),
            upscale=defaults.number("upscale", DefaultSettings.upscale, 1.0, ENGINE_MAX_HIRES_SCALE, low_open=True),
        ),
        limits=limit_settings,
        safety=SafetySettings(checker=safety.choice("checker", SafetySettings.checker, CHECKERS)),
        executor=_executor_settings(executor, ray),
    )
    if models:
        settings = replace(settings, **_several_models(models, data, settings.executor))
    for section in (discord, model, storage, defaults, limits, safety, executor, ray, *models):
        section.check_unknown()
    return settings


def _model_settings(model: Section, name: str = "") -> ModelSettings:
    return ModelSettings(
        path=model.text("path", ModelSettings.path, allow_empty=False),
        device=model.device("device", ModelSettings.device),
        dtype=model.choice("dtype", ModelSettings.dtype, DTYPES),
        memory=model.choice("memory", ModelSettings.memory, MEMORY_MODES),
        compile=model.flag("compile", ModelSettings.compile),
        cuda_graphs=model.flag("cuda_graphs", ModelSettings.cuda_graphs),
        channels_last=model.auto_flag("channels_last", ModelSettings.channels_last),
        fuse_qkv=model.auto_flag("fuse_qkv", ModelSettings.fuse_qkv),
        loras=_lora_folder(model),
        name=name,
        max_side=model.integer("max_side", ModelSettings.max_side, 0, ENGINE_MAX_SIDE),
        max_cost=model.integer("max_cost", ModelSettings.max_cost, 0, MAX_ID),
    )


def _lora_folder(model: Section) -> str:
    folder = model.text("loras", ModelSettings.loras)
    if folder and not Path(folder).expanduser().is_dir():
        raise ConfigError(f"{model.name}.loras: must be a folder of LoRA .safetensors files, not {show(folder)}")
    return folder


def _model_tables(data: Mapping[str, Any]) -> list[Section]:
    """The [models.NAME] tables, each a section; their `default` and `path` keys are read by `_several_models`."""
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"models: must be tables ([models.NAME]), not {show(tables)}")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"models.{name}: must be a table ([models.{name}]) with a path, not {show(table)}")
        if not MODEL_NAME.fullmatch(name):
            raise ConfigError(
                f"models.{name}: a model name is 1-32 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
    if len(tables) > MAX_MODELS:
        raise ConfigError(f"models: at most {MAX_MODELS} models, not {len(tables)}")
    return [Section(f"models.{name}", tables, key=name) for name in tables]


def _several_models(tables: list[Section], data: Mapping[str, Any], executor: ExecutorSettings) -> dict[str, Any]:
    """`models` and `model` (the default) of Settings, from [models.NAME] tables."""
    if "model" in data:
        raise ConfigError("model: use either one [model] table or [models.NAME] tables, not both")
    models = []
    for table in tables:
        name = table.name.removeprefix("models.")
        if "path" not in table.table:
            raise ConfigError(f"{table.name}.path: missing; give the model's hub id, folder or .safetensors file")
        models.append((_model_settings(table, name), table.flag("default", False)))
    defaults = [m for m, is_default in models if is_default]
    if len(defaults) > 1:
        raise ConfigError(f"models: only one model can have default = true, not {', '.join(m.name for m in defaults)}")
    default = defaults[0] if defaults else models[0][0]
    for m, _ in models:
        if m.device != default.device:
            raise ConfigError(
                f"models.{m.name}.device: every model runs on one device, here {default.device!r} (the default "
                f"model's), not {m.device!r}"
            )
    if executor.backend == "ray" and len(models) > 1:
        raise ConfigError('models: [executor] backend = "ray" serves one model for now: keep one [models] table')
    return {"models": tuple(m for m, _ in models), "model": default}


def _executor_settings(executor: Section, ray: Section) -> ExecutorSettings:
    settings = ExecutorSettings(
        backend=executor.choice("backend", ExecutorSettings.backend, BACKENDS),
        ray=RaySettings(
            address=ray.ray_address("address", RaySettings.address),
            workers=ray.integer("workers", RaySettings.workers, 0, 1024),
            gpus_per_worker=ray.number("gpus_per_worker", RaySettings.gpus_per_worker, 0.0, 64.0),
        ),
        max_loaded=executor.integer("max_loaded", ExecutorSettings.max_loaded, 0, MAX_MODELS),
    )
    if settings.ray.workers == 0 and settings.ray.gpus_per_worker == 0:
        raise ConfigError(
            "executor.ray.workers: must be at least 1 when executor.ray.gpus_per_worker is 0 "
            "(0 starts one worker per GPU, and CPU workers use none), not 0"
        )
    return settings
