"""The dead-letter envelope (schema ``dlq.v1``): everything needed to understand and replay one
message that ended terminally.

An envelope is a plain JSON-serialisable ``dict``::

    {
      "schema": "dlq.v1",
      "id": "9f1c...",                     # unique per envelope (uuid4 hex)
      "dead_lettered_at": 1767261600.25,   # wall-clock seconds since the epoch
      "payload": {...},                    # the original payload (redacted fields masked)
      "headers": {...},                    # the original transport headers (redacted likewise)
      "raw": null,                         # undecodable body: {"encoding": "utf-8"|"base64", ...}
      "source": {"system", "key", "group", "message_id", "enqueued_at"},
      "error": {"reason", "stage", "type", "cause_type", "message", "traceback"},
      "attempts": {"in_process", "delivery_count",
                   "history": [{"type", "count", "first", "last"}]},
      "origin": {"handler", "service", "host", "pid"},
      "trace": {"original": {"traceparent", "tracestate", "trace_id"} | null,
                "processing": {"traceparent", "trace_id", "span_id"} | null},
      "replay_count": 0,                   # from the x-replay-count header of the message
      "redacted": ["payload.user.password"],
      "truncated": []                      # what the size caps cut: traceback, message, ...
    }
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..delivery import Delivery

__all__ = [
    "DEAD_LETTER_TRACEPARENT_HEADER",
    "DEFAULT_REDACT",
    "MASK",
    "REASONS",
    "REPLAY_COUNT_HEADER",
    "REPLAY_OF_HEADER",
    "SCHEMA",
    "STAGES",
    "EnvelopeBuilder",
    "EnvelopeOptions",
    "Redactor",
    "envelope_size",
    "exception_name",
    "replay_count_of",
]

SCHEMA = "dlq.v1"
"""The envelope schema this version writes."""

REASONS = (
    "retries_exhausted",
    "non_retryable",
    "decode_error",
    "timeout",
    "rejected",
    "delivery_limit",
    "budget_exhausted",
)
"""Why a message was dead-lettered."""

STAGES = ("decode", "handle")
"""Where it failed: before the handler (poison) or in it."""

REPLAY_COUNT_HEADER = "x-replay-count"
"""Header carrying how many times a message has been replayed from a dead-letter store."""

REPLAY_OF_HEADER = "x-replay-of"
"""Header carrying the id of the envelope a message was replayed from."""

DEAD_LETTER_TRACEPARENT_HEADER = "x-dead-letter-traceparent"
"""Header carrying the ``traceparent`` of the processing that dead-lettered a replayed message."""

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


def exception_name(exc_type: type[BaseException]) -> str:
    """``module.QualName`` of an exception type (builtins by bare name: ``ValueError``)."""
    module = exc_type.__module__
    if module == "builtins":
        return exc_type.__qualname__
    return f"{module}.{exc_type.__qualname__}"


def replay_count_of(headers: Mapping[str, str]) -> int:
    """The replay count a message carries in its :data:`REPLAY_COUNT_HEADER` (0 when absent)."""
    raw = headers.get(REPLAY_COUNT_HEADER)
    if raw is None:
        return 0
    try:
        return max(0, int(str(raw).strip()))
    except ValueError:
        return 0


def envelope_size(envelope: Mapping[str, Any]) -> int:
    """Bytes of the envelope's compact UTF-8 JSON form."""
    return len(_dumps(envelope).encode("utf-8"))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)


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
                    if isinstance(item, str) and len(item) >= _MIN_SECRET_CHARS:
                        secrets.add(item)
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

    @staticmethod
    def scrub(text: str, secrets: set[str]) -> str:
        """``text`` with every secret replaced by :data:`MASK`."""
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


@dataclass(frozen=True, slots=True)
class EnvelopeOptions:
    """How envelopes are written.

    Args:
        redact: Field names masked in payload and headers, at any depth.
        max_envelope_bytes: Cap on the whole envelope's JSON size; when over it, the traceback,
            the error message, the headers and finally the payload are cut (and listed in
            ``truncated``) until it fits.
        max_traceback_frames: Innermost frames kept per exception in the traceback.
        max_traceback_bytes: Cap on the traceback text (its end is kept).
        max_message_chars: Cap on the exception message.
        service_name: Service name recorded in ``origin`` (default: ``OTEL_SERVICE_NAME`` or
            ``unknown_service``).

    Raises:
        ConfigError: a cap is out of range.
    """

    redact: tuple[str, ...] = DEFAULT_REDACT
    max_envelope_bytes: int = 256 * 1024
    max_traceback_frames: int = 30
    max_traceback_bytes: int = 16 * 1024
    max_message_chars: int = 2000
    service_name: str | None = None

    def __post_init__(self) -> None:
        redact: object = self.redact
        object.__setattr__(
            self, "redact", (redact,) if isinstance(redact, str) else tuple(self.redact)
        )
        limits = (
            ("max_envelope_bytes", 4096),
            ("max_traceback_frames", 0),
            ("max_traceback_bytes", 256),
            ("max_message_chars", 64),
        )
        for name, minimum in limits:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


class EnvelopeBuilder:
    """Builds ``dlq.v1`` envelopes for one middleware (immutable after construction).

    Args:
        options: Redaction and size caps.
        system: The source backend or system name (``memory``, ``redis``), if known.
        handler_name: The handler's dotted name, if known.
    """

    __slots__ = ("handler_name", "host", "options", "redactor", "service", "system")

    def __init__(
        self,
        options: EnvelopeOptions | None = None,
        *,
        system: str | None = None,
        handler_name: str | None = None,
    ) -> None:
        self.options = options or EnvelopeOptions()
        self.redactor = Redactor(self.options.redact)
        self.system = system
        self.handler_name = handler_name
        self.service = (
            self.options.service_name or os.environ.get("OTEL_SERVICE_NAME") or "unknown_service"
        )
        self.host = socket.gethostname()

    def build(
        self,
        delivery: Delivery,
        exc: BaseException,
        *,
        reason: str,
        stage: str,
        monotonic_now: float,
        wall_now: float | None = None,
    ) -> dict[str, Any]:
        """The envelope for ``delivery``, which ended with ``exc``.

        Args:
            delivery: The failed delivery.
            exc: The exception that ended it.
            reason: One of :data:`REASONS`.
            stage: ``"decode"`` (never reached the handler) or ``"handle"``.
            monotonic_now: The clock's reading now, to turn failure times into wall time.
            wall_now: Wall-clock time now (``time.time()`` when ``None``).

        Returns:
            A JSON-serialisable ``dict`` no larger than ``max_envelope_bytes``.
        """
        opts = self.options
        now = time.time() if wall_now is None else wall_now
        redactor = self.redactor
        message = delivery.message
        decode_failed = message is not None and message.decode_error is not None
        payload, paths, secrets = redactor.redact(
            None if decode_failed else delivery.payload, "payload"
        )
        headers, header_paths, header_secrets = redactor.redact(dict(delivery.headers), "headers")
        paths += header_paths
        secrets |= header_secrets
        raw = _raw_body(message.raw) if message is not None and decode_failed else None
        truncated: list[str] = []
        text = str(exc)
        if len(text) > opts.max_message_chars:
            text = text[: opts.max_message_chars] + f"... [{len(text)} chars]"
            truncated.append("message")
        tb, cut = _traceback(exc, opts.max_traceback_frames, opts.max_traceback_bytes)
        if cut:
            truncated.append("traceback")
        if secrets:
            text = Redactor.scrub(text, secrets)
            tb = Redactor.scrub(tb, secrets)
        cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        offset = now - monotonic_now
        history = [
            {
                "type": name,
                "count": record.count,
                "first": record.first + offset,
                "last": record.last + offset,
            }
            for name, record in (delivery.failures or {}).items()
        ]
        ran = stage == "handle" and reason != "delivery_limit"
        envelope: dict[str, Any] = {
            "schema": SCHEMA,
            "id": uuid.uuid4().hex,
            "dead_lettered_at": now,
            "payload": payload,
            "headers": headers,
            "raw": raw,
            "source": {
                "system": self.system,
                "key": delivery.key,
                "group": delivery.group,
                "message_id": delivery.message_id,
                "enqueued_at": message.enqueued_at if message is not None else None,
            },
            "error": {
                "reason": reason,
                "stage": stage,
                "type": exception_name(type(exc)),
                "cause_type": None if cause is None else exception_name(type(cause)),
                "message": text,
                "traceback": tb,
            },
            "attempts": {
                "in_process": delivery.attempt - delivery.delivery_count + 1 if ran else 0,
                "delivery_count": delivery.delivery_count,
                "history": history,
            },
            "origin": {
                "handler": self.handler_name,
                "service": self.service,
                "host": self.host,
                "pid": os.getpid(),
            },
            "trace": {
                "original": _original_trace(delivery.headers),
                "processing": _processing_trace(),
            },
            "replay_count": replay_count_of(delivery.headers),
            "redacted": paths,
            "truncated": truncated,
        }
        return _fit(envelope, opts.max_envelope_bytes)

    def scrub(self, text: str, delivery: Delivery) -> str:
        """``text`` with the values of ``delivery``'s redacted fields masked (for log lines)."""
        secrets = (
            self.redactor.redact(delivery.payload)[2]
            | (self.redactor.redact(dict(delivery.headers))[2])
        )
        return Redactor.scrub(text, secrets) if secrets else text


def _raw_body(raw: bytes | str | None) -> dict[str, str] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return {"encoding": "utf-8", "data": raw}
    try:
        return {"encoding": "utf-8", "data": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"encoding": "base64", "data": base64.b64encode(raw).decode("ascii")}


def _traceback(exc: BaseException, frames: int, max_bytes: int) -> tuple[str, bool]:
    cut = False
    if frames <= 0:
        text = "".join(traceback.format_exception_only(type(exc), exc))
        cut = exc.__traceback__ is not None
    else:
        if len(traceback.extract_tb(exc.__traceback__)) > frames:
            cut = True
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, -frames))
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        cut = True
        marker = f"[traceback truncated: {len(data) - max_bytes} bytes omitted]\n"
        tail = data[-(max_bytes - len(marker)) :].decode("utf-8", errors="ignore")
        text = marker + tail
    return text, cut


def _original_trace(headers: Mapping[str, str]) -> dict[str, str | None] | None:
    traceparent = headers.get("traceparent")
    if not traceparent:
        return None
    parts = str(traceparent).split("-")
    return {
        "traceparent": str(traceparent),
        "tracestate": headers.get("tracestate"),
        "trace_id": parts[1] if len(parts) == 4 else None,
    }


def _processing_trace() -> dict[str, str] | None:
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    trace_id = format(context.trace_id, "032x")
    span_id = format(context.span_id, "016x")
    return {
        "traceparent": f"00-{trace_id}-{span_id}-{int(context.trace_flags):02x}",
        "trace_id": trace_id,
        "span_id": span_id,
    }


def _fit(envelope: dict[str, Any], limit: int) -> dict[str, Any]:
    """Cut the envelope down to ``limit`` bytes, least useful parts first."""
    size = envelope_size(envelope)
    if size <= limit:
        return envelope
    error = envelope["error"]
    truncated: list[str] = envelope["truncated"]

    def mark(part: str) -> None:
        if part not in truncated:
            truncated.append(part)

    # 1. The traceback: keep its end (the frames nearest the failure and the exception line).
    tb: str = error["traceback"]
    keep = max(0, len(tb) - (size - limit) - 64)
    if tb:
        error["traceback"] = ("[traceback truncated]\n" + tb[-keep:]) if keep else ""
        mark("traceback")
        size = envelope_size(envelope)
    # 2. The exception message.
    if size > limit and len(error["message"]) > 256:
        error["message"] = error["message"][:256] + "... [truncated]"
        mark("message")
        size = envelope_size(envelope)
    # 3. Headers other than trace context and replay bookkeeping.
    if size > limit:
        kept = ("traceparent", "tracestate", REPLAY_COUNT_HEADER, REPLAY_OF_HEADER)
        envelope["headers"] = {k: v for k, v in envelope["headers"].items() if k in kept}
        mark("headers")
        size = envelope_size(envelope)
    # 4. The body: replaced by a preview; such an envelope can no longer be replayed.
    for field in ("payload", "raw"):
        if size > limit and envelope[field] is not None:
            body = _dumps(envelope[field]).encode("utf-8")
            envelope[field] = None
            base = envelope_size(envelope)
            room = max(0, (limit - base - 64) // 2)  # escaping can double the preview's size
            envelope[f"{field}_preview"] = body[:room].decode("utf-8", errors="ignore")
            mark(field)
            size = envelope_size(envelope)
    # 5. The failure history (bounded by the number of distinct exception types).
    if size > limit and envelope["attempts"]["history"]:
        envelope["attempts"]["history"] = envelope["attempts"]["history"][-3:]
        mark("history")
        size = envelope_size(envelope)
    if size > limit:
        # Only pathological keys, ids or names are left: keep the bare minimum.
        minimal = {
            k: envelope[k] for k in ("schema", "id", "dead_lettered_at", "replay_count", "redacted")
        }
        minimal["payload"] = None
        minimal["headers"] = {}
        minimal["raw"] = None
        minimal["error"] = {
            "reason": error["reason"],
            "stage": error["stage"],
            "type": error["type"][:200],
            "cause_type": None,
            "message": "",
            "traceback": "",
        }
        minimal["source"] = {k: None for k in envelope["source"]}
        minimal["attempts"] = {**envelope["attempts"], "history": []}
        minimal["origin"] = {k: None for k in envelope["origin"]}
        minimal["trace"] = {"original": None, "processing": None}
        minimal["redacted"] = envelope["redacted"][:20]
        minimal["truncated"] = [*truncated, "envelope"]
        return minimal
    return envelope
