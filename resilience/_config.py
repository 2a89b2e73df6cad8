"""Loud validation of declarative configuration: every error names the key, value and choices."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from .errors import ConfigError

__all__ = ["Reader", "resolve_exception"]

_MISSING = object()


class Reader:
    """Reads one section of a policy mapping, tracking which keys were used.

    Args:
        raw: The section's mapping.
        path: Its dotted location (for messages), e.g. ``"retry"``.
    """

    def __init__(self, raw: object, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path} must be a table/mapping, got {type(raw).__name__}")
        for key in raw:
            if not isinstance(key, str):
                raise ConfigError(f"{path}: keys must be strings, got {key!r}")
        self.raw: Mapping[str, Any] = raw
        self.path = path
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        """Whether ``key`` is present."""
        return key in self.raw

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The raw value (marks the key as used)."""
        self._seen.add(key)
        if key in self.raw:
            return self.raw[key]
        if default is _MISSING:
            raise ConfigError(f"{self._key(key)} is required")
        return default

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        """An integer, optionally ``>= minimum``."""
        value = self.get(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._key(key)} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._key(key)} must be >= {minimum}, got {value}")
        return value

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> Any:
        """A float (ints accepted) within bounds."""
        value = self.get(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"{self._key(key)} must be a number, got {value!r}")
        value = float(value)
        if minimum is not None:
            if exclusive_minimum and value <= minimum:
                raise ConfigError(f"{self._key(key)} must be > {minimum:g}, got {value:g}")
            if value < minimum:
                raise ConfigError(f"{self._key(key)} must be >= {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self._key(key)} must be <= {maximum:g}, got {value:g}")
        return value

    def seconds(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> Any:
        """Seconds as a float (number or timedelta)."""
        return self.number(key, default, minimum=0.0, exclusive_minimum=positive)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        """A bool."""
        value = self.get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)} must be true or false, got {value!r}")
        return value

    def string(self, key: str, default: Any = _MISSING, *, choices: Iterable[str] = ()) -> Any:
        """A string, optionally one of ``choices``."""
        value = self.get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{self._key(key)} must be a string, got {value!r}")
        allowed = tuple(choices)
        if allowed and value not in allowed:
            raise ConfigError(
                f"{self._key(key)} must be one of {', '.join(allowed)}; got {value!r}"
            )
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings (a single string is accepted as a one-item list)."""
        value = self.get(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._key(key)} must be a list of strings, got {value!r}")
        return tuple(value)

    def section(self, key: str) -> Reader | None:
        """A nested table, or ``None`` when absent or ``false``."""
        value = self.get(key, None)
        if value is None or value is False:
            return None
        return Reader(value, self._key(key))

    def finish(self) -> None:
        """Raise on keys that were never read (typos, unsupported options)."""
        unknown = sorted(set(self.raw) - self._seen)
        if unknown:
            allowed = ", ".join(sorted(self._seen)) or "(none)"
            raise ConfigError(
                f"unknown key{'s' if len(unknown) > 1 else ''} in {self.path or 'policy'}: "
                f"{', '.join(unknown)} (allowed: {allowed})"
            )


def resolve_exception(name: str, path: str) -> type[BaseException]:
    """Resolve ``"ConnectionError"`` or ``"package.module.ErrorClass"`` to an exception type."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: exception names must be non-empty strings, got {name!r}")
    module_name, _, attr = name.rpartition(".")
    module_name = module_name or "builtins"
    try:
        module = importlib.import_module(module_name)
        obj = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{path}: cannot import exception {name!r} ({exc})") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise ConfigError(f"{path}: {name!r} is not an exception class")
    return obj
