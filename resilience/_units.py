"""Time values: float seconds or ``timedelta``, normalised once."""

from __future__ import annotations

from datetime import timedelta

from .errors import ConfigError

__all__ = ["seconds"]


def seconds(value: float | timedelta | None, name: str, *, allow_none: bool = False) -> float:
    """Normalise ``float | timedelta`` to float seconds, rejecting negatives and NaN."""
    if value is None:
        if allow_none:
            return float("inf")
        raise ConfigError(f"{name} must be a number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise ConfigError(f"{name} must be seconds (number or timedelta), got {value!r}")
    result = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if result != result or result < 0:
        raise ConfigError(f"{name} must be >= 0 seconds, got {value!r}")
    return result
