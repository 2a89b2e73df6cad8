"""Settings helpers shared by every broker backend: reading and checking environment
variables and option values, and hiding passwords in URLs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

__all__ = ["check_name", "check_positive_int", "check_seconds", "env_int", "env_text", "redact"]


def env_text(env: Mapping[str, str], name: str) -> str | None:
    """The variable ``name`` of ``env`` without surrounding spaces; ``None`` when unset or empty."""
    raw = env.get(name, "").strip()
    return raw or None


def env_int(name: str, raw: str, minimum: int, allowed: str) -> int:
    """The integer the variable ``name`` holds (``raw``), at least ``minimum``.

    Raises:
        ValueError: not an integer, or below ``minimum``; the message names the variable, its
            value and ``allowed``.
    """
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not valid: expected {allowed}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} is not valid: expected {allowed}")
    return value


def check_seconds(value: float | timedelta, name: str, *, allow_zero: bool = False) -> float:
    """``value`` (a number or ``timedelta``) as finite float seconds, > 0 (or >= 0)."""
    amount = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise TypeError(f"{name} must be seconds (a number or timedelta), got {value!r}")
    amount = float(amount)
    if not math.isfinite(amount) or amount < 0 or (amount == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return amount


def check_positive_int(value: int, name: str) -> int:
    """``value`` when it is an integer >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_name(value: str, name: str) -> str:
    """``value`` stripped, when it is a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value.strip()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
