"""The wire format of stream entries, shared with the published ``abe-redis`` provider.

An entry is a flat field map. Field ``data`` holds the payload as a JSON object (what
``abe-redis`` writes and reads); each transport header travels in a field of its own named
``h:<header>`` (for example ``h:traceparent``), which readers that know only ``data`` ignore.
"""

from __future__ import annotations

import contextlib
import json
import json.scanner
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from types import MappingProxyType
from typing import Any

from abe.backends.message_queue.base.extensions import InboundMessage

__all__ = [
    "DATA_FIELD",
    "HEADER_PREFIX",
    "NO_HEADERS",
    "EntryDecodeError",
    "decode_batch",
    "decode_entry",
    "encode_entry",
    "parse_json",
]

DATA_FIELD = b"data"
"""The field holding the JSON payload."""

HEADER_PREFIX = b"h:"
"""Prefix of the fields holding transport headers."""

NO_HEADERS: Mapping[str, str] = MappingProxyType({})
"""The shared, read-only headers of an entry that has none (saves one dict per entry)."""

DELIVERIES_HEADER = "x-abe-deliveries"
"""Header of an entry re-added after a delayed redelivery: deliveries of the message before
this entry existed (added to the entry's own delivery count)."""

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def parse_json(data: bytes) -> Any:
    """``json.loads(data)`` for UTF-8 ``data``, faster on the common case.

    The C scanner parses the document directly; anything unusual (surrounding whitespace,
    trailing data, invalid input) goes through :func:`json.loads` for its exact result or error.

    Raises:
        ValueError: ``data`` is not UTF-8 JSON (``json.JSONDecodeError`` or
            ``UnicodeDecodeError``).
        RecursionError: ``data`` nests arrays or objects deeper than the parser allows.
    """
    text = data.decode()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


class EntryDecodeError(ValueError):
    """A stream entry is not in the wire format: no ``data`` field, or not a JSON object.

    When a parser error caused it (``json.JSONDecodeError``, ``UnicodeDecodeError``,
    ``RecursionError``, ...) that error is its ``__cause__``.
    """


def encode_entry(
    payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> dict[str | bytes, str | bytes]:
    """The XADD field map for ``payload`` and ``headers``.

    Args:
        payload: A JSON-serialisable mapping.
        headers: Transport headers; names and values must be strings.

    Returns:
        ``{"data": <json>, "h:<name>": <value>, ...}``.

    Raises:
        TypeError: ``payload`` is not a mapping, is not JSON-serialisable, or a header is not a
            string.
        ValueError: ``payload`` holds a value JSON cannot represent (a circular reference).
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    try:
        data = _dumps(payload if isinstance(payload, dict) else dict(payload))
    except TypeError as exc:
        raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc
    fields: dict[str | bytes, str | bytes] = {DATA_FIELD: data}
    if headers:
        for name, value in headers.items():
            if not isinstance(name, str) or not isinstance(value, str) or not name:
                raise TypeError(
                    f"headers must map non-empty strings to strings, got {name!r}: {value!r}"
                )
            fields[HEADER_PREFIX + name.encode()] = value
    return fields


def decode_entry(
    key: str,
    entry_id: bytes,
    fields: Mapping[bytes, bytes],
    group: str | None,
    delivery_count: int,
    handle: Any,
) -> InboundMessage:
    """Turn one stream entry into an :class:`InboundMessage`; never raises.

    An entry that is not in the wire format is returned as *poison*: an empty payload,
    ``decode_error`` set and the raw ``data`` bytes kept in ``raw``. Whatever goes wrong while
    decoding one entry (invalid UTF-8 or JSON, JSON nested too deep for the parser, a value
    that is not a JSON object, a missing ``data`` field, any other exception) makes that entry
    poison: no entry's content, size or shape can stop a reader.

    Args:
        key: The stream key.
        entry_id: The entry id as Redis returned it.
        fields: The entry's field map (bytes to bytes).
        group: The consumer group it was read in.
        delivery_count: How often the group has delivered it, this time included.
        handle: Backend-private settlement data stored on the message.

    Returns:
        The message.
    """
    try:
        return _decode_entry(key, entry_id, fields, group, delivery_count, handle)
    except Exception as exc:  # a last resort: _decode_entry turns known failures into poison
        return _poison(key, entry_id, fields, group, delivery_count, handle, exc)


def _decode_entry(
    key: str,
    entry_id: bytes,
    fields: Mapping[bytes, bytes],
    group: str | None,
    delivery_count: int,
    handle: Any,
) -> InboundMessage:
    message_id = entry_id.decode()
    enqueued_at = int(entry_id[: entry_id.index(b"-")]) * 0.001
    data = fields.get(DATA_FIELD)
    error: BaseException | None = None
    payload: Any = None
    if data is None:
        error = EntryDecodeError(f"entry {message_id} of {key!r} has no 'data' field")
    else:
        try:
            payload = parse_json(data)
        except Exception as exc:  # not only ValueError: deep nesting raises RecursionError
            error = EntryDecodeError(
                f"entry {message_id} of {key!r}: data is not JSON: "
                f"{type(exc).__name__}: {_clip(exc)}"
            )
            error.__cause__ = exc
        else:
            if type(payload) is not dict:
                error = EntryDecodeError(
                    f"entry {message_id} of {key!r}: data is JSON "
                    f"{type(payload).__name__}, not an object"
                )
    headers = _headers(fields)
    earlier = headers.get(DELIVERIES_HEADER)
    if earlier is not None:  # re-added after a delayed redelivery: count the deliveries before
        with contextlib.suppress(ValueError):
            delivery_count += min(max(0, int(earlier)), 2**31)
    if error is not None:
        raw: bytes | None = data
        if raw is None:
            raw = _joined(fields)
        return InboundMessage(
            {},
            key,
            message_id,
            delivery_count,
            headers,
            enqueued_at,
            group,
            raw,
            error,
            handle,
            len(raw),
        )
    return InboundMessage(
        payload,
        key,
        message_id,
        delivery_count,
        headers,
        enqueued_at,
        group,
        None,
        None,
        handle,
        len(data),  # type: ignore[arg-type]  # data is bytes here: decoding succeeded
    )


def _headers(fields: Mapping[bytes, bytes]) -> Mapping[str, str]:
    """The ``h:<name>`` fields as text (invalid UTF-8 replaced, never an error)."""
    found = {
        name[2:].decode(errors="replace"): value.decode(errors="replace")
        for name, value in fields.items()
        if name.startswith(HEADER_PREFIX)
    }
    return found or NO_HEADERS


def _joined(fields: Mapping[bytes, bytes]) -> bytes:
    """The whole field map as ``name=value`` pairs (the raw body of an entry without data)."""
    return b" ".join(bytes(name) + b"=" + bytes(value) for name, value in fields.items())


def _clip(exc: BaseException, limit: int = 200) -> str:
    try:
        text = str(exc)
    except Exception:
        return "<str() failed>"
    return text if len(text) <= limit else text[:limit] + "..."


def _poison(
    key: str,
    entry_id: bytes,
    fields: Mapping[bytes, bytes] | Any,
    group: str | None,
    delivery_count: int,
    handle: Any,
    exc: Exception,
) -> InboundMessage:
    """The poison message of an entry whose decoding failed in an unforeseen way."""
    message_id = bytes(entry_id).decode(errors="replace")
    error = EntryDecodeError(
        f"entry {message_id} of {key!r} could not be decoded: {type(exc).__name__}: {_clip(exc)}"
    )
    error.__cause__ = exc
    raw: bytes | None
    try:
        data = fields.get(DATA_FIELD)
        raw = data if isinstance(data, bytes) else _joined(fields)
    except Exception:
        raw = None
    try:
        headers = _headers(fields)
    except Exception:
        headers = NO_HEADERS
    try:
        enqueued_at: float | None = int(entry_id[: entry_id.index(b"-")]) * 0.001
    except Exception:
        enqueued_at = None
    return InboundMessage(
        {},
        key,
        message_id,
        delivery_count,
        headers,
        enqueued_at,
        group,
        raw,
        error,
        handle,
        None if raw is None else len(raw),
    )


def decode_batch(
    key: str,
    entries: Iterable[Sequence[Any]],
    group: str,
    handle: Any,
    held: MutableMapping[str, bytes] | None,
    append: Callable[[InboundMessage], object],
    counts: Mapping[bytes, int] | None = None,
) -> int:
    """Decode the entries of one stream reply, hand each to ``append`` and record it as held.

    The common entry (only a ``data`` field holding compact JSON) takes a fast path; anything
    else goes through :func:`decode_entry`, which makes an entry that fails to decode in any way
    poison instead of raising. Entries deleted while pending (no fields) are skipped.

    Args:
        key: The stream key.
        entries: ``(entry id, fields)`` pairs, the fields either a map (as redis-py parses
            them) or the flat ``[name, value, ...]`` list the server sends.
        group: The consumer group.
        handle: Stored on every message (the reader that settles it).
        held: Receives ``message_id -> entry id bytes`` for every message (``None``: the
            caller recorded them already).
        append: Called with every message, in order.
        counts: Delivery counts by entry id (``None``: first deliveries, count 1; an entry
            missing from it counts 2).

    Returns:
        How many entries were poison (undecodable).
    """
    poison = 0
    scan = _scan
    no_headers = NO_HEADERS
    stamp_prefix = b"-"  # entries of one millisecond share their publish time: parse it once
    stamp = 0.0
    for entry_id, fields in entries:
        if fields is None:
            continue
        message_id = entry_id.decode()
        if held is not None:
            held[message_id] = entry_id
        count = 1 if counts is None else counts.get(entry_id, 2)
        data = None
        if type(fields) is list:  # as the server sent it: [name, value, ...]
            if len(fields) == 2 and fields[0] == DATA_FIELD:
                data = fields[1]
        elif len(fields) == 1:  # as redis-py parses it: a map
            data = fields.get(DATA_FIELD)
        if type(data) is bytes:
            try:
                text = data.decode()
                payload, end = scan(text, 0)
            except Exception:  # StopIteration, ValueError, RecursionError, ...
                pass  # decode_entry says what is wrong
            else:
                if end == len(text) and type(payload) is dict:
                    if not entry_id.startswith(stamp_prefix):
                        dash = entry_id.index(b"-")
                        stamp_prefix = entry_id[: dash + 1]
                        stamp = int(entry_id[:dash]) * 0.001
                    append(
                        InboundMessage(
                            payload,
                            key,
                            message_id,
                            count,
                            no_headers,
                            stamp,
                            group,
                            None,
                            None,
                            handle,
                            len(data),
                        )
                    )
                    continue
        message = decode_entry(key, entry_id, _field_map(fields), group, count, handle)
        if message.decode_error is not None:
            poison += 1
        append(message)
    return poison


def _field_map(fields: Any) -> Any:
    """``fields`` as a map: a flat ``[name, value, ...]`` list paired up (what redis-py would
    have built), anything else as it is (:func:`decode_entry` copes with what is not a map)."""
    if type(fields) is not list:
        return fields
    try:
        pairs = iter(fields)
        return dict(zip(pairs, pairs, strict=False))
    except Exception:  # an unhashable name: decode_entry makes the entry poison
        return fields
