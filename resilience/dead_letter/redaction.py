"""Masking of sensitive fields in dead-letter envelopes and log lines.

What is promised (also in ``docs/dead-letter.md``):

* **Which fields.** A field name is split into lowercase words at ``_``, ``-``, ``.``, spaces
  and other punctuation, at camelCase humps (``xApiKey`` -> ``x api key``, ``APIKey`` ->
  ``api key``) and between letters and digits; digit-only words are dropped. A configured name
  is split the same way. The field is masked when the configured name's words are the first or
  the last words of the field name (``client_secret``, ``x_api_key``, ``passwordHash``,
  ``Proxy-Authorization``), or when the whole name, without separators, equals the configured
  one (``APIKEY``, ``api-key``). A configured word in the middle of a name (``max_token_count``)
  does not match, nor does a longer word that merely contains it (``secretary``, ``tokens``).
* **Which values.** Everything a masked field holds, at any depth of the payload or headers:
  strings, numbers (booleans and ``None`` excepted), bytes, and the same inside mappings and
  lists under the masked field. The walk is iterative, so there is no depth limit and no
  ``RecursionError``; the *rendered* copy stops at 64 levels (deeper values become
  ``"[TOO DEEP]"``) but masked fields below that level are still found and their values still
  collected.
* **Where.** Collected values are replaced by :data:`MASK` in the rendered payload and headers
  (wherever else they occur there, too), in exception messages and tracebacks, and in the log
  lines the dead-letter layer writes. In that free text a value is substituted only when it has
  4 characters or more (``str()`` of a number: ``1234`` is, ``123`` is not), so that short
  values do not blank out unrelated text; in the payload and headers a masked field is always
  masked whatever its length.
* **Patterns in free text**, whatever the payload holds: the credentials after ``Bearer`` or
  ``Basic`` (any capitalisation but ``basic``, the English word) and the value of every
  ``name: value``, ``name=value`` or ``"name": "value"`` pair whose name is masked by the rule
  above (an ``Authorization: Token abc`` value is masked with its scheme). These apply to
  exception messages, tracebacks, log lines, header values and strings of the payload.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["DEFAULT_REDACT", "MASK", "Redactor", "field_words"]

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
"""Field names masked by default (see the module docstring for the matching rule)."""

_MIN_SECRET_CHARS = 4
_MAX_DEPTH = 64
_REPR_CHARS = 1000
_MAX_PATH_CHARS = 256
_CACHE_LIMIT = 4096
_TOO_DEEP = "[TOO DEEP]"

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
"""Words of a field name: acronyms, capitalised or lowercase words, digit runs."""

_CREDENTIALS = re.compile(
    r"(?<![\w-])(Bearer|bearer|BEARER|Basic|BASIC)([ \t]+)([A-Za-z0-9\-._~+/]{4,}=*)"
)
"""An HTTP ``Bearer`` / ``Basic`` credential (RFC 7235 token68) in free text."""


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_MAX_NAME_CHARS = 128

_TEXT_VALUE = re.compile(
    r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'"""
    r"""|(?:(?i:bearer|basic|token|digest|negotiate|ntlm)[ \t]+)?[^\s"',;&}\])\[]+"""
)
"""The value after a pair's head: quoted, or up to a space or delimiter (with an auth scheme)."""

_RAW_PAIR = re.compile(
    r'"((?:[^"\\]|\\.){1,128})"(\s*:\s*)("(?:[^"\\]|\\.)*"|[^,}\]\s{\[][^,}\]\s]*)'
)
"""A ``"name": value`` pair with a string or other scalar value (objects and lists are left)."""


def field_words(name: str) -> tuple[str, ...]:
    """The lowercase words of a field name, as the matching rule sees them.

    Args:
        name: A field name (``x-Api-Key``, ``clientSecret``, ``API_KEY_2``).

    Returns:
        Its words without digit-only ones (``("x", "api", "key")``).
    """
    return tuple(word.lower() for word in _WORD.findall(name) if not word.isdigit())


class Redactor:
    """Masks configured field names at any depth and remembers the values it masked.

    See the module docstring for the exact rule. Values it masks are also scrubbed from free
    text (exception messages, tracebacks, log lines) by :meth:`mask_text`, together with
    ``Bearer`` / ``Basic`` credentials and ``name=value`` pairs of masked names.

    Args:
        fields: Field names to mask.
    """

    __slots__ = ("_cache", "_joined", "_words", "fields")

    def __init__(self, fields: Iterable[str] = DEFAULT_REDACT) -> None:
        words = {field_words(f) for f in fields}
        words.discard(())
        self._words: tuple[tuple[str, ...], ...] = tuple(sorted(words))
        self._joined = frozenset("".join(w) for w in self._words)
        self.fields = frozenset(self._joined)
        """The configured names, lowercase and without separators."""
        self._cache: dict[str, bool] = {}

    def masks(self, name: str) -> bool:
        """Whether a field called ``name`` is masked.

        Args:
            name: The field name.

        Returns:
            ``True`` when a configured name's words start or end it, or it equals one
            ignoring case and separators.
        """
        cache = self._cache
        found = cache.get(name)
        if found is None:
            found = self._match(name)
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[name] = found
        return found

    def _match(self, name: str) -> bool:
        if not self._words:
            return False
        words = field_words(name)
        if not words:
            return False
        joined = self._joined
        if "".join(words) in joined or words[0] in joined or words[-1] in joined:
            return True
        count = len(words)
        for masked in self._words:
            size = len(masked)
            if size <= count and (words[:size] == masked or words[count - size :] == masked):
                return True
        return False

    # -- structured values ----------------------------------------------------------------------

    def redact(
        self,
        value: Any,
        path: str = "",
        *,
        text_pairs: bool = False,
        cut: list[str] | None = None,
    ) -> tuple[Any, list[str], set[str]]:
        """A JSON-ready copy of ``value`` with matching fields masked.

        Strings in the copy also have collected values and ``Bearer`` / ``Basic`` credentials
        masked (and, with ``text_pairs``, ``name=value`` pairs of masked names: used for
        headers, whose values are often such text).

        Args:
            value: Any payload value (dicts, lists, scalars; bytes become text or base64, other
                objects their repr; the copy stops at 64 levels, deeper values become
                ``"[TOO DEEP]"``, but masked fields are found at any depth).
            path: The dotted location of ``value``, prefixed to the reported paths.
            text_pairs: Also mask ``name=value`` pairs inside strings.
            cut: When given, receives the paths of the values replaced by ``"[TOO DEEP]"``.

        Returns:
            The redacted copy, the dotted paths of the masked fields (and of strings that held
            a masked value or credential), and the masked values as text (for
            :meth:`mask_text`).
        """
        paths: list[str] = []
        secrets: set[str] = set()
        root: list[Any] = [None]
        # Strings copied: (container of the copy, key in it, the container's path).
        strings: list[tuple[Any, Any, str]] = []
        # Containers still to copy: (value, container of the copy, key in it, path, depth).
        stack: list[tuple[Any, Any, Any, str, int]] = []
        words = self._words
        cache = self._cache
        if not isinstance(value, _CONTAINERS):
            _place(value, root, 0, path, 0, stack, strings)
            bare = root[0]
            if strings:  # a bare string
                masked = self._mask(bare, (), secrets, text_pairs)
                if masked != bare:
                    paths.append(_short(path))
                    bare = masked
            return bare, paths, secrets
        stack.append((value, root, 0, path, 0))
        while stack:
            item, out, slot, where, depth = stack.pop()
            if depth >= _MAX_DEPTH:
                out[slot] = _TOO_DEEP
                if cut is not None:
                    cut.append(_short(where))
                self._find_deeper(item, where, paths, secrets)
                continue
            depth += 1
            if isinstance(item, Mapping):
                copy: dict[str, Any] = {}
                out[slot] = copy
                for key, child in item.items():
                    name = key if type(key) is str else str(key)
                    if words:
                        hit = cache.get(name)
                        if hit is None:
                            hit = self.masks(name)
                        if hit:
                            copy[name] = MASK
                            paths.append(_short(_child(where, name)))
                            _collect(child, secrets)
                            continue
                    kind = type(child)
                    if kind is str:
                        copy[name] = child
                        strings.append((copy, name, where))
                    elif kind is int or kind is float or kind is bool or child is None:
                        copy[name] = child
                    else:
                        _place(child, copy, name, where, depth, stack, strings)
            else:
                children = list(item)
                listing: list[Any] = [None] * len(children)
                out[slot] = listing
                for i, child in enumerate(children):
                    kind = type(child)
                    if kind is str:
                        listing[i] = child
                        strings.append((listing, i, where))
                    elif kind is int or kind is float or kind is bool or child is None:
                        listing[i] = child
                    else:
                        _place(child, listing, i, where, depth, stack, strings)
        if strings:
            self._mask_strings(strings, paths, secrets, text_pairs)
        return root[0], paths, secrets

    def _find_deeper(self, value: Any, path: str, paths: list[str], secrets: set[str]) -> None:
        """Collect the masked fields below the rendered depth (each container once, so a cycle
        ends)."""
        if not self._words:
            return
        stack: list[tuple[Any, str]] = [(value, path)]
        seen: set[int] = set()
        while stack:
            item, where = stack.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, Mapping):
                for key, child in item.items():
                    name = str(key)
                    child_path = f"{where}.{name}"
                    if self.masks(name):
                        paths.append(_short(child_path))
                        _collect(child, secrets)
                    elif isinstance(child, _CONTAINERS):
                        stack.append((child, child_path))
            else:
                for i, child in enumerate(item):
                    if isinstance(child, _CONTAINERS):
                        stack.append((child, f"{where}[{i}]"))

    def _mask_strings(
        self,
        strings: list[tuple[Any, Any, str]],
        paths: list[str],
        secrets: set[str],
        pairs: bool,
    ) -> None:
        """Mask credentials, pairs and collected values in the copied strings."""
        known = len(secrets)
        ordered = _ordered(secrets)
        for out, slot, where in strings:
            text = out[slot]
            masked = self._mask(text, ordered, secrets, pairs)
            if masked is not text and masked != text:
                out[slot] = masked
                paths.append(_short(_child(where, slot)))
        if len(secrets) > known:
            # A credential found in one string may be quoted in another visited before it.
            ordered = _ordered(secrets)
            for out, slot, where in strings:
                text = out[slot]
                masked = _substitute(text, ordered)
                if masked != text:
                    out[slot] = masked
                    at = _short(_child(where, slot))
                    if at not in paths:
                        paths.append(at)

    # -- free text ------------------------------------------------------------------------------

    def mask_text(
        self, text: str, secrets: Iterable[str] = (), *, collect: set[str] | None = None
    ) -> str:
        """``text`` with masked values, credentials and pairs of masked names replaced.

        Args:
            text: An exception message, traceback, log line or string value.
            secrets: Values collected by :meth:`redact`; those of 4 characters or more are
                replaced wherever they occur.
            collect: When given, receives the credentials and pair values masked here.

        Returns:
            The masked text.
        """
        return self._mask(text, _ordered(secrets), collect, True)

    def _mask(
        self, text: str, ordered: tuple[str, ...], collect: set[str] | None, pairs: bool
    ) -> str:
        if ordered:
            text = _substitute(text, ordered)
        if ("earer" in text or "asic" in text or "EARER" in text or "ASIC" in text) and (
            " " in text or "\t" in text
        ):

            def credential(match: re.Match[str]) -> str:
                if collect is not None:
                    collect.add(match.group(3))
                return f"{match.group(1)}{match.group(2)}{MASK}"

            text = _CREDENTIALS.sub(credential, text)
        if pairs and self._words and (":" in text or "=" in text):
            text = self._mask_pairs(text, collect)
        return text

    def _mask_pairs(self, text: str, collect: set[str] | None) -> str:
        """Mask the values of ``name: value``, ``name=value`` and quoted pairs of masked names
        (a name is letters, digits, ``_``, ``.`` and ``-``, starting with a letter or ``_``)."""
        parts: list[str] = []
        done = 0
        # The scan starts at separators (few) rather than trying a name at every character.
        for at in _separators(text):
            if at < done:
                continue
            colon = text[at] == ":"
            name = _name_before(text, at, colon)
            if name is None or not self.masks(name):
                continue
            start = at + 1
            if colon:
                while start < len(text) and text[start] in " \t":
                    start += 1
            value = _TEXT_VALUE.match(text, start)
            if value is None:
                continue
            found = value.group(0)
            quote = found[0] if found[0] in "\"'" and len(found) > 1 else ""
            inner = found[1:-1] if quote else found
            if not inner or inner == MASK:
                continue
            if collect is not None and len(inner) >= _MIN_SECRET_CHARS:
                collect.add(inner)
            parts.append(text[done : value.start()])
            parts.append(f"{quote}{MASK}{quote}")
            done = value.end()
        if not parts:
            return text
        parts.append(text[done:])
        return "".join(parts)

    def redact_text(self, text: str, path: str = "raw") -> tuple[str, list[str], set[str]]:
        """Mask ``"field": value`` pairs (string or scalar values) of configured fields in text
        that did not parse (an undecodable body is often almost-JSON), and credentials.

        Args:
            text: The raw text.
            path: Prefixed to the reported paths.

        Returns:
            The masked text, the masked fields as ``path.field``, and the masked values.
        """
        paths: list[str] = []
        secrets: set[str] = set()
        if self._words and '"' in text:

            def mask(match: re.Match[str]) -> str:
                name = match.group(1)
                if not self.masks(name):
                    return match.group(0)
                paths.append(_short(f"{path}.{name}"))
                value = match.group(3)
                value = value[1:-1] if value.startswith('"') else value
                if len(value) >= _MIN_SECRET_CHARS:
                    secrets.add(value)
                return f'"{name}"{match.group(2)}"{MASK}"'

            text = _RAW_PAIR.sub(mask, text)
        masked = self.mask_text(text, secrets, collect=secrets)
        if masked != text and not paths:
            paths.append(path)
        return masked, paths, secrets

    @staticmethod
    def scrub(text: str, secrets: Iterable[str]) -> str:
        """``text`` with every secret of 4 characters or more replaced by :data:`MASK` (longest
        first, so a secret that contains another one is masked whole).

        Only the collected values; :meth:`mask_text` also masks credentials and pairs.
        """
        return _substitute(text, _ordered(secrets))


def _ordered(secrets: Iterable[str]) -> tuple[str, ...]:
    """The secrets worth substituting, longest first (so one that contains another is masked
    whole)."""
    return tuple(sorted((s for s in secrets if len(s) >= _MIN_SECRET_CHARS), key=len, reverse=True))


def _substitute(text: str, ordered: tuple[str, ...]) -> str:
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


_CONTAINERS = (Mapping, list, tuple, set, frozenset)


def _place(
    value: Any,
    out: Any,
    slot: Any,
    where: str,
    depth: int,
    stack: list[tuple[Any, Any, Any, str, int]],
    strings: list[tuple[Any, Any, str]],
) -> None:
    """Copy ``value`` (held at ``slot`` of a container at path ``where``) into ``out[slot]``;
    a container is queued for the walk instead."""
    if isinstance(value, _CONTAINERS):
        out[slot] = None
        stack.append((value, out, slot, _child(where, slot), depth))
    elif isinstance(value, str):
        out[slot] = value
        strings.append((out, slot, where))
    elif value is None or isinstance(value, bool | int | float):
        out[slot] = value
    elif isinstance(value, bytes | bytearray):
        out[slot] = _bytes_text(value)
        strings.append((out, slot, where))
    else:
        out[slot] = _repr(value)


def _child(where: str, slot: str | int) -> str:
    """The path of ``slot`` (a key or an index) in the container at ``where``."""
    if type(slot) is int:
        return f"{where}[{slot}]"
    return f"{where}.{slot}" if where else str(slot)


def _separators(text: str) -> list[int]:
    """Positions of ``:`` and ``=`` in ``text``, in order."""
    found: list[int] = []
    for char in ":=":
        at = text.find(char)
        while at >= 0:
            found.append(at)
            at = text.find(char, at + 1)
    found.sort()
    return found


def _name_before(text: str, at: int, spaced: bool) -> str | None:
    """The pair name ending just before the separator at ``at`` (after optional spaces, when
    ``spaced``, and an optional closing quote), or ``None``."""
    end = at
    if spaced:
        while end > 0 and text[end - 1] in " \t":
            end -= 1
    if end > 0 and text[end - 1] in "\"'":
        end -= 1
    start = end
    limit = max(0, end - _MAX_NAME_CHARS - 1)
    while start > limit and text[start - 1] in _NAME_CHARS:
        start -= 1
    if start == end or (start == limit and start > 0 and text[start - 1] in _NAME_CHARS):
        return None  # no name, or one longer than any field name
    while start < end and text[start] not in _NAME_START:
        start += 1  # a name starts with a letter or "_" (not "12:30")
    return text[start:end] if start < end else None


def _short(path: str) -> str:
    """A reported path, shortened in the middle when a deep one would bloat the envelope."""
    if len(path) <= _MAX_PATH_CHARS:
        return path
    half = (_MAX_PATH_CHARS - 3) // 2
    return f"{path[:half]}...{path[-half:]}"


def _bytes_text(value: bytes | bytearray) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(bytes(value)).decode("ascii")


def _repr(value: object) -> str:
    try:
        return repr(value)[:_REPR_CHARS]
    except Exception:  # a broken __repr__ (or one that recurses forever) must not stop us
        return f"<{type(value).__qualname__} object>"


def _collect(value: Any, secrets: set[str]) -> None:
    """Remember, as text, every value a masked field holds, at any depth (iteratively:
    ``{"authorization": {"bearer": "..."}}`` masks the whole mapping, and its strings and
    numbers must not reappear in messages either)."""
    stack = [value]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) >= _MIN_SECRET_CHARS:
                secrets.add(item)
        elif item is None or isinstance(item, bool):
            continue
        elif isinstance(item, int | float):
            try:
                text = str(item)
            except ValueError:  # an int too long for str(): nothing text could quote
                continue
            if len(text) >= _MIN_SECRET_CHARS:
                secrets.add(text)
        elif isinstance(item, bytes | bytearray):
            stack.append(bytes(item).decode("utf-8", errors="ignore"))
        elif isinstance(item, Mapping | list | tuple | set | frozenset):
            if id(item) in seen:
                continue
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, Mapping) else item)
        else:
            text = _repr(item)
            if len(text) >= _MIN_SECRET_CHARS:
                secrets.add(text)
