"""ConfigError and the checks every config section validates with: each error names the key, the value and
how to fix it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key and the fix."""


def invalid(key: str, value: Any, fix: str) -> ConfigError:
    """The error for a bad value of `key`: names the key, the value and how to fix it."""
    return ConfigError(f"config key '{key}' = {value!r} is invalid. FIX THIS by {fix}")


def fail(key: str, value: Any, fix: str) -> None:
    """Raise `invalid(key, value, fix)`."""
    raise invalid(key, value, fix)


def check_choice(key: str, value: Any, choices: tuple) -> None:
    """`value` is one of `choices`."""
    if value not in choices:
        fail(key, value, f"choosing one of {list(choices)}")


def check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    """`value` is a number > 0 (>= 0 with allow_zero); a bool is not a number here."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        fail(key, value, "setting a number " + (">= 0" if allow_zero else "> 0"))


def check_int(key: str, value: Any, least: int | None, also: str = "") -> None:
    """`value` is an integer (not a bool), >= `least` unless that is None; `also` ends the fix."""
    if not isinstance(value, int) or isinstance(value, bool) or (least is not None and value < least):
        fail(key, value, f"setting an integer{'' if least is None else f' >= {least}'}{also}")
