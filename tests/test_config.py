"""bot.config: real TOML files in, typed settings or one-line ConfigErrors out."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sdengine
from bot import config
from bot.config import SCHEDULERS, ConfigError, Settings, load_settings
from bot.preflight import model_spec
from sdengine import request as engine

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_file_loads_and_equals_the_defaults() -> None:
    assert load_settings(EXAMPLE) == Settings()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))
    assert settings == Settings()
    assert settings.model.path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert settings.storage.database == Path("sdbot.sqlite3")
    assert settings.limits.max_cost == 512 * 512 * 50 * 4
    assert settings.limits.max_image_bytes == 10 * 1024 * 1024


def test_every_key_is_read(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            """
            [discord]
            token_env = "SDBOT_TOKEN"
            guild_ids = [111111111111111111, 222222222222222222]
            allowed_guild_ids = [111111111111111111]
            allowed_channel_ids = [333333333333333333]
            owner_ids = [444444444444444444]
            nsfw_channels_only = true

            [model]
            path = "tiny"
            device = "cuda:1"
            dtype = "bf16"
            memory = "low"
            compile = true
            cuda_graphs = false
            channels_last = true
            fuse_qkv = false

            [storage]
            database = "data/bot.sqlite3"

            [defaults]
            steps = 30
            guidance = 5          # an int where a float is expected is fine
            scheduler = "euler_a"
            negative = "blurry, 'low' \\"quality\\" 🙈"
            strength = 1

            [limits]
            max_pending_per_user = 1
            max_queue = 10
            max_steps = 150
            max_side = 1024
            max_count = 2
            cooldown_seconds = 2.5
            max_cost = 1_000_000
            job_timeout_seconds = 60
            max_batch = 8
            max_image_bytes = 1024
            """,
        )
    )
    assert settings.discord.token_env == "SDBOT_TOKEN"
    assert settings.discord.guild_ids == (111111111111111111, 222222222222222222)
    assert settings.discord.allowed_guild_ids == (111111111111111111,)
    assert settings.discord.allowed_channel_ids == (333333333333333333,)
    assert settings.discord.owner_ids == (444444444444444444,)
    assert settings.discord.nsfw_channels_only is True
    assert (settings.model.path, settings.model.device, settings.model.dtype) == ("tiny", "cuda:1", "bf16")
    assert settings.model.memory == "low" and settings.model.compile is True and settings.model.cuda_graphs is False
    assert (settings.model.channels_last, settings.model.fuse_qkv) == (True, False)
    # ...and each reaches the engine's load arguments, which preflight builds positionally
    spec = model_spec(settings, settings.model)
    assert (spec.compile, spec.cuda_graphs, spec.channels_last, spec.fuse_qkv) == (True, False, True, False)
    assert settings.storage.database == Path("data/bot.sqlite3")
    assert settings.defaults.steps == 30
    assert settings.defaults.guidance == 5.0 and isinstance(settings.defaults.guidance, float)
    assert settings.defaults.scheduler == "euler_a"
    assert settings.defaults.negative == "blurry, 'low' \"quality\" 🙈"
    assert settings.defaults.strength == 1.0
    limits = settings.limits
    assert (limits.max_pending_per_user, limits.max_queue, limits.max_steps) == (1, 10, 150)
    assert (limits.max_side, limits.max_count, limits.cooldown_seconds) == (1024, 2, 2.5)
    assert (limits.max_cost, limits.job_timeout_seconds, limits.max_batch) == (1_000_000, 60.0, 8)
    assert limits.max_image_bytes == 1024


def test_kernel_settings_are_auto_unless_set(tmp_path: Path) -> None:
    """Auto (None) lets the engine turn them on for CUDA only; "auto" written out means the same."""
    assert (Settings().model.channels_last, Settings().model.fuse_qkv) == (None, None)
    text = "[models.a]\npath = 'a'\nchannels_last = 'auto'\nfuse_qkv = true\n"
    model = load_settings(write(tmp_path, text)).model
    assert (model.channels_last, model.fuse_qkv) == (None, True)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.limits.max_steps = 100  # type: ignore[misc]


def test_lower_max_steps_lowers_the_default_steps(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[limits]\nmax_steps = 10\n"))
    assert settings.defaults.steps == 10


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[limits]\nmax_steps = 'abc'", "limits.max_steps", "must be an integer from 1 to 150, not 'abc'"),
        ("[limits]\nmax_steps = 151", "limits.max_steps", "from 1 to 150, not 151"),
        ("[limits]\nmax_steps = 0", "limits.max_steps", "not 0"),
        ("[limits]\nmax_steps = 20.0", "limits.max_steps", "integer"),
        ("[limits]\nmax_steps = true", "limits.max_steps", "not true"),  # bool is not an int
        ("[limits]\nmax_count = 5", "limits.max_count", "from 1 to 4"),
        ("[limits]\ncooldown_seconds = -1", "limits.cooldown_seconds", "a number from 0"),
        ("[limits]\njob_timeout_seconds = 0", "limits.job_timeout_seconds", "above 0"),
        ("[limits]\njob_timeout_seconds = nan", "limits.job_timeout_seconds", "not nan"),
        ("[limits]\ncooldown_seconds = inf", "limits.cooldown_seconds", "not inf"),
        ("[limits]\nmax_step = 10", "limits.max_step", "unknown key (did you mean max_steps?)"),
        ("[defaults]\nscheduler = 'heun'", "defaults.scheduler", "one of " + ", ".join(SCHEDULERS)),
        ("[defaults]\nguidance = '7.5'", "defaults.guidance", "a number from 0 to 30, not '7.5'"),
        ("[defaults]\nstrength = 0", "defaults.strength", "above 0 and at most 1"),
        ("[defaults]\nhires_strength = 1.5", "defaults.hires_strength", "above 0 and at most 1, not 1.5"),
        ("[defaults]\nhires_upscaler = 'esrgan'", "defaults.hires_upscaler", "one of latent, lanczos"),
        ("[defaults]\nupscale = 1", "defaults.upscale", "above 1 and at most 4, not 1"),
        ("[defaults]\nsteps = 60", "defaults.steps", "at most limits.max_steps (50), not 60"),
        ("[defaults]\nnegative = 3", "defaults.negative", "a string"),
        ("[model]\ndevice = 'gpu'", "model.device", "cuda:N"),
        ("[model]\ndtype = 'int8'", "model.dtype", "one of auto, fp32, fp16, bf16"),
        ("[model]\nmemory = 'tiny'", "model.memory", "one of auto, fast, low"),
        ("[model]\ncompile = 'yes'", "model.compile", "true or false"),
        ("[models.a]\npath = 'a'\ncuda_graphs = 'auto'", "models.a.cuda_graphs", "true or false"),
        ("[model]\nchannels_last = 'on'", "model.channels_last", "must be true, false or \"auto\", not 'on'"),
        ("[models.a]\npath = 'a'\nfuse_qkv = 1", "models.a.fuse_qkv", 'must be true, false or "auto", not 1'),
        ("[model]\npath = ''", "model.path", "non-empty"),
        ("[model]\nloras = 5", "model.loras", "a string"),
        ("[models.a]\npath = 'a'\nloras = '/no/such/folder'", "models.a.loras", "a folder of LoRA .safetensors"),
        ("[storage]\ndatabase = 5", "storage.database", "a string"),
        ("[discord]\nguild_ids = 123", "discord.guild_ids", "a list of Discord IDs"),
        ("[discord]\nowner_ids = ['123']", "discord.owner_ids", "a list of Discord IDs"),
        ("[discord]\nallowed_channel_ids = [-5]", "discord.allowed_channel_ids", "positive"),
        ("[discord]\nnsfw_channels_only = 'yes'", "discord.nsfw_channels_only", "true or false, not 'yes'"),
        ("[discord]\ntoken_env = 'my token'", "discord.token_env", "environment variable"),
        ("[discrod]\ntoken_env = 'X'", "discrod", "unknown key at the top level (did you mean discord?)"),
        ("steps = 25", "steps", "use [discord], [model]"),
        ("limits = 3", "limits", "must be a table"),
        ("[defaults]\nnegative = '''\nline one\nline two'''\nscheduler = 'nope'", "defaults.scheduler", "'nope'"),
        ("[model]\npath = 'a'\n[models.b]\npath = 'b'", "model", "either one [model] table or [models.NAME]"),
        ("[models.a]\npath = 'a'\ndefault = true\n[models.b]\npath = 'b'\ndefault = true", "models", "a, b"),
        ("[models.a]\ndtype = 'fp16'", "models.a.path", "missing"),
        ("[models.'my model']\npath = 'a'", "models.my model", "letters, digits"),
        ("[models.a]\npath = 'a'\nmax_sid = 5", "models.a.max_sid", "did you mean max_side?"),
        ("[models.a]\npath = 'a'\nmax_side = 4096", "models.a.max_side", "from 0 to 2048"),
        ("[models.a]\npath = 'a'\n[models.b]\npath = 'b'\ndevice = 'cpu'", "models.b.device", "one device"),
        ("models = 'tiny'", "models", "must be tables"),
        ("[models]\na = 'tiny'", "models.a", "must be a table"),
        ("[executor]\nmax_loaded = -1", "executor.max_loaded", "from 0 to 25"),
        (
            "[executor]\nbackend = 'ray'\n[models.a]\npath = 'a'\n[models.b]\npath = 'b'",
            "models",
            "serves one model",
        ),
    ],
)
def test_invalid_values_raise_one_line_naming_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith(f"{key}: "), message
    assert fragment in message
    assert "\n" not in message


def test_bad_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_steps = 10\nmax_queue 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "not valid TOML" in message and "line 3" in message and str(path) in message
    assert "\n" not in message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[model]\npath = '\xff'\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_settings(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "x.toml")
    assert str(info.value) == f"config file '{tmp_path / 'x.toml'}' not found: copy config.example.toml and edit it"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path)


def test_token_comes_from_the_named_variable() -> None:
    assert Settings().token({"DISCORD_TOKEN": " abc.def.ghi \n"}) == "abc.def.ghi"
    custom = dataclasses.replace(Settings(), discord=dataclasses.replace(Settings().discord, token_env="SDBOT_TOKEN"))
    assert custom.token({"SDBOT_TOKEN": "xyz"}) == "xyz"


@pytest.mark.parametrize("env", [{}, {"DISCORD_TOKEN": ""}, {"DISCORD_TOKEN": "  "}])
def test_missing_token_never_shows_a_token(env: dict[str, str]) -> None:
    secret = "MTIzNDU2Nzg5MDEy.fake.token-value"
    env = {**env, "SDBOT_TOKEN": secret, "OTHER": secret}
    settings = Settings()
    with pytest.raises(ConfigError) as info:
        settings.token(env)
    assert str(info.value) == "DISCORD_TOKEN is not set: export your bot token in it"
    assert secret not in repr(info.value)
    assert secret not in repr(settings)


def test_token_is_not_kept_in_settings(tmp_path: Path) -> None:
    secret = "MTIzNDU2Nzg5MDEy.fake.token-value"
    settings = load_settings(write(tmp_path, ""))
    assert settings.token({"DISCORD_TOKEN": secret}) == secret
    assert secret not in repr(settings)


def toml_value(value: int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value)


@given(value=st.one_of(st.integers(), st.integers(min_value=-5, max_value=200), st.booleans(), st.floats()))
def test_max_steps_loads_in_range_or_raises_config_error(
    tmp_path_factory: pytest.TempPathFactory, value: int | float | bool
) -> None:
    path = tmp_path_factory.getbasetemp() / "max_steps.toml"
    path.write_text(f"[limits]\nmax_steps = {toml_value(value)}\n", encoding="utf-8")
    try:
        settings = load_settings(path)
    except ConfigError as err:
        assert str(err).startswith("limits.max_steps: must be an integer from 1 to 150, not ")
        assert not (type(value) is int and 1 <= value <= 150)
    else:
        assert type(value) is int and 1 <= value <= 150
        assert settings.limits.max_steps == value
        assert settings.defaults.steps == min(25, value)


def test_engine_limits_match_sdengine() -> None:
    """bot.config copies these to avoid importing torch; this catches the copies drifting."""
    assert config.SCHEDULERS == sdengine.SCHEDULERS
    assert config.ENGINE_MAX_STEPS == engine.MAX_STEPS
    assert config.ENGINE_MAX_SIDE == engine.MAX_SIDE
    assert config.ENGINE_MAX_COUNT == engine.MAX_COUNT
    assert config.ENGINE_MAX_GUIDANCE == engine.MAX_GUIDANCE
    assert config.ENGINE_MAX_PROMPT_CHARS == engine.MAX_PROMPT_CHARS
    assert tuple(sdengine.HIRES_UPSCALERS) == config.HIRES_UPSCALERS
    assert config.ENGINE_MAX_HIRES_SCALE == engine.MAX_HIRES_SCALE


def test_several_models_keep_their_order_and_default(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            """
            [models.sd15]
            path = "stable-diffusion-v1-5/stable-diffusion-v1-5"

            [models.xl]
            path = "/models/sdxl-base"
            default = true
            max_cost = 1000

            [executor]
            max_loaded = 1
            """,
        )
    )
    assert [m.label for m in settings.all_models] == ["sd15", "xl"]
    assert settings.model.label == "xl" and settings.model_named("xl").max_cost == 1000
    assert settings.executor.max_loaded == 1
    lone = load_settings(write(tmp_path, '[model]\npath = "tiny"'))
    assert [m.label for m in lone.all_models] == ["tiny"]  # a lone [model] is named by its path, as rows were


def test_lora_folders_reach_the_model_specs(tmp_path: Path) -> None:
    from bot.preflight import model_spec

    (tmp_path / "loras").mkdir()
    settings = load_settings(
        write(tmp_path, f"[models.a]\npath = 'tiny'\nloras = '{tmp_path / 'loras'}'\n[models.b]\npath = 'tiny'\n")
    )
    assert [model_spec(settings, m).loras for m in settings.all_models] == [str(tmp_path / "loras"), ""]
