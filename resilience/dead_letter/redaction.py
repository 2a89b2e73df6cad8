"""Masking of sensitive fields in dead-letter envelopes and log lines."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_REDACT", "MASK", "Redactor"]

MASK = "[REDACTED]"
"""What a redacted value is replaced with."""

DEFAULT_REDACT = (
    "password",
    "passwd",
    "secret",
    "token",
    "access_token",
    "refresh_token",
    "api_key",
    "authorization",
    "cookie",
)
"""Field names masked by default (case-insensitive; ``-`` and ``_`` are ignored)."""

_MIN_SECRET_CHARS = 4
_MAX_DEPTH = 64
_REPR_CHARS = 1000


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


class Redactor:
    """Masks configured field names at any depth and remembers the secrets it masked.

    Matching is by whole field name, case-insensitive, ignoring ``-`` and ``_`` (so ``api_key``
    matches ``API-Key`` and ``apikey``). String values it masks (of 4 characters or more) are
    also scrubbed from free text such as exception messages and tracebacks by :meth:`scrub`.

    Args:
        fields: Field names to mask.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: tuple[str, ...] | list[str] = DEFAULT_REDACT) -> None:
        self.fields = frozenset(_normalise(f) for f in fields)

    def redact(self, value: Any, path: str = "") -> tuple[Any, list[str], set[str]]:
        """A JSON-ready copy of ``value`` with matching fields masked.

        Args:
            value: Any payload value (dicts, lists, scalars; bytes become text or base64, other
                objects their repr; values nested deeper than 64 levels are replaced).
            path: The dotted location of ``value``, prefixed to the reported paths.

        Returns:
            The redacted copy, the dotted paths of the masked fields, and the string values
            that were masked (for :meth:`scrub`).
        """
        paths: list[str] = []
        secrets: set[str] = set()
        return self._walk(value, path, paths, secrets, 0), paths, secrets

    def _walk(self, value: Any, path: str, paths: list[str], secrets: set[str], depth: int) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if depth >= _MAX_DEPTH:
            return "[TOO DEEP]"
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in value.items():
                name = str(key)
                where = f"{path}.{name}" if path else name
                if self.fields and _normalise(name) in self.fields:
                    out[name] = MASK
                    paths.append(where)
                    _collect(item, secrets, depth)
                else:
                    out[name] = self._walk(item, where, paths, secrets, depth + 1)
            return out
        if isinstance(value, list | tuple | set | frozenset):
            return [
                self._walk(item, f"{path}[{i}]", paths, secrets, depth + 1)
                for i, item in enumerate(value)
            ]
        if isinstance(value, bytes | bytearray):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                return base64.b64encode(bytes(value)).decode("ascii")
        return repr(value)[:_REPR_CHARS]

    def redact_text(self, text: str, path: str = "raw") -> tuple[str, list[str], set[str]]:
        """Mask ``"field": value`` pairs (string or scalar values) of configured fields in text
        that did not parse (an undecodable body is often almost-JSON).

        Args:
            text: The raw text.
            path: Prefixed to the reported paths.

        Returns:
            The masked text, the masked fields as ``path.field``, and the masked values.
        """
        if not self.fields or '"' not in text:
            return text, [], set()
        paths: list[str] = []
        secrets: set[str] = set()

        def mask(match: re.Match[str]) -> str:
            name = match.group(1)
            if _normalise(name) not in self.fields:
                return match.group(0)
            paths.append(f"{path}.{name}")
            value = match.group(3)
            value = value[1:-1] if value.startswith('"') else value
            if len(value) >= _MIN_SECRET_CHARS:
                secrets.add(value)
            return f'"{name}"{match.group(2)}"{MASK}"'

        return _RAW_PAIR.sub(mask, text), paths, secrets

    @staticmethod
    def scrub(text: str, secrets: set[str]) -> str:
        """``text`` with every secret replaced by :data:`MASK` (longest first, so a secret that
        contains another one is masked whole)."""
        for secret in sorted(secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, MASK)
        return text


_RAW_PAIR = re.compile(
    r'"((?:[^"\\]|\\.){1,128})"(\s*:\s*)("(?:[^"\\]|\\.)*"|[^,}\]\s{\[][^,}\]\s]*)'
)
"""A ``"name": value`` pair with a string or other scalar value (objects and lists are left)."""


def _collect(value: Any, secrets: set[str], depth: int) -> None:
    """Remember the text a masked value holds, at any depth (``{"authorization": {"bearer":
    "..."}}`` masks the whole mapping, and its strings must not reappear in messages either)."""
    if isinstance(value, str):
        if len(value) >= _MIN_SECRET_CHARS:
            secrets.add(value)
    elif isinstance(value, bytes | bytearray):
        _collect(bytes(value).decode("utf-8", errors="ignore"), secrets, depth)
    elif depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            for item in value.values():
                _collect(item, secrets, depth + 1)
        elif isinstance(value, list | tuple | set | frozenset):
            for item in value:
                _collect(item, secrets, depth + 1)
