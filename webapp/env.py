"""Typed readers for settings that come from environment variables.

Each reader raises ImproperlyConfigured naming the variable and the expected
form, so a typo in a deployment fails at start-up instead of at first use.
"""

import logging
import os

from django.core.exceptions import ImproperlyConfigured


def env_str(name: str, default: str) -> str:
    """Return the variable's value, or ``default`` when it is unset or empty.

    Empty counts as unset, as in the other readers, because an empty
    GLASSBOX_DATA_DIR or MODEL_DIR would otherwise be the current directory.
    """
    return os.environ.get(name) or default


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    return value


def env_float(name: str, default: float, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    return value


def env_port(name: str) -> int:
    """Return a TCP port number, or 0 when the variable is unset or empty."""
    value = env_int(name, 0, 0)
    if value > 65535:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum 65535")
    return value


def env_log_level(name: str, default: str) -> str:
    """Return a ``logging`` level name, such as DEBUG or WARNING, in upper case."""
    raw = env_str(name, default)
    level = raw.strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise ImproperlyConfigured(
            f"{name}={raw!r} is not a logging level; use DEBUG, INFO, WARNING, "
            "ERROR or CRITICAL"
        )
    return level


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use true or false)")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]
