"""Reading one [table] of a TOML config: each reader checks one key's type and range, and says in one line what is
wrong. `bot.config` builds its settings with these."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
RAY_ADDRESSES = ("auto", "local", "ray://HOST:PORT", "HOST:PORT")
MAX_ID = 2**63 - 1  # Discord snowflakes fit a signed 64-bit int, as do TOML integers


class ConfigError(Exception):
    """The config file or the environment is unusable; the message is one line that says what to change."""


class Section:
    """One [table] of the file; each reader checks one key's type and range and records it as known."""

    def __init__(self, name: str, data: Mapping[str, Any], *, key: str | None = None) -> None:
        key = key or name
        table = data.get(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table ([{name}]), not {show(table)}")
        self.name = name
        self.table: dict[str, Any] = table
        self.known: set[str] = set()

    def table_section(self, key: str) -> Section:
        """The sub-table [NAME.KEY]."""
        self.known.add(key)
        return Section(f"{self.name}.{key}", self.table, key=key)

    def _get(self, key: str) -> Any:
        self.known.add(key)
        return self.table.get(key)

    def _fail(self, key: str, allowed: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.name}.{key}: must be {allowed}, not {show(value)}")

    def check_unknown(self) -> None:
        for key in self.table:
            if key not in self.known:
                raise ConfigError(
                    f"{self.name}.{key}: unknown key{suggest(key, self.known)}; [{self.name}] takes {names(self.known)}"
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

    def auto_flag(self, key: str, default: bool | None) -> bool | None:
        """true, false or "auto" (None: the engine decides)."""
        value = self._get(key)
        if value is None:
            return default
        if value == "auto":
            return None
        if not isinstance(value, bool):
            raise self._fail(key, 'true, false or "auto"', value)
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
            raise self._fail(key, f"one of {names(allowed)}", value)
        assert isinstance(value, str)
        return value

    def device(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", value):
            raise self._fail(key, f"one of {names(DEVICES)}", value)
        return value

    def ray_address(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        host_port = r"[A-Za-z0-9.\-]+:([0-9]{1,5})"
        match = re.fullmatch(rf"auto|local|(?:ray://)?{host_port}", value) if isinstance(value, str) else None
        if match is None or (match.group(1) is not None and not 1 <= int(match.group(1)) <= 65535):
            raise self._fail(key, f"one of {names(RAY_ADDRESSES)}", value)
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


def show(value: Any) -> str:
    """A value as it looks in TOML, kept short so the error stays one readable line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = repr(value)  # repr escapes newlines in strings
    return text if len(text) <= 60 else text[:57] + "..."


def one_line(text: str) -> str:
    return " ".join(text.split())


def names(names: set[str] | tuple[str, ...]) -> str:
    ordered = names if isinstance(names, tuple) else sorted(names)
    return ", ".join(ordered)


def suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
