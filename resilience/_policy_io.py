"""Policy files and environment overrides: TOML in, TOML out, ``RESILIENCE_*`` variables."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["apply_env", "dump_toml", "read_toml"]


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a one-line :class:`ConfigError`."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"policy file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy file {p} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {p}: {exc.strerror}") from None


def apply_env(data: dict[str, Any], environ: Mapping[str, str], prefix: str) -> None:
    """Apply ``PREFIX_SECTION__KEY=value`` overrides to ``data`` in place."""
    for name in sorted(environ):
        if not name.startswith(prefix) or "__" not in name[len(prefix) :]:
            continue
        parts = [p.lower() for p in name[len(prefix) :].split("__")]
        if not all(parts):
            raise ConfigError(f"environment variable {name}: empty path segment")
        raw = environ[name]
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target = data
        for part in parts[:-1]:
            nested = target.get(part)
            if nested is None or nested is False:
                nested = target[part] = {}
            if not isinstance(nested, dict):
                raise ConfigError(f"environment variable {name}: {part} is not a table")
            target = nested
        target[parts[-1]] = value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError(f"cannot write {value!r} as TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write a policy mapping as TOML (tables of scalars, lists and inline tables)."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)
            lines.append("")
        else:
            lines.insert(0, f"{key} = {_toml_value(value)}")
    return "\n".join(lines).rstrip() + "\n"
