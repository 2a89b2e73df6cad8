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
      "attempts": {"in_process", "delivery_count", "total",
                   "history": [{"type", "count", "first", "last"}],
                   "earlier": [{"attempt", "tier", "type", "at", "host", "pid"}]},
      "origin": {"handler", "service", "host", "pid"},
      "trace": {"original": {"traceparent", "tracestate", "trace_id"} | null,
                "processing": {"traceparent", "trace_id", "span_id"} | null},
      "replay_count": 0,                   # from the x-replay-count header of the message
      "write_failures": {"count", "first", "last",   # failed writes of this envelope's message
                         "recent": [{"at", "type", "message"}]},
      "redacted": ["payload.user.password"],
      "truncated": []                      # what the size caps cut: traceback, message, ...
    }
"""

from __future__ import annotations

import base64
import functools
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._handover import carried_attempts, earlier_attempts
from ..errors import ConfigError
from ._limits import bounded_traceback, envelope_size, fit_encoded
from .redaction import DEFAULT_REDACT, MASK, Redactor

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

_KEEP_HEADERS = ("traceparent", "tracestate", REPLAY_COUNT_HEADER, REPLAY_OF_HEADER)
"""Headers the size cap keeps when it has to drop the others."""


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
        return min(max(0, int(str(raw).strip())), _MAX_REPLAY_COUNT)
    except ValueError:
        return 0


_MAX_REPLAY_COUNT = 2**31 - 1
"""Larger counts in a header are read as this (a count is never huge; a header can be)."""


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
    """Builds ``dlq.v1`` envelopes for one middleware (its settings are fixed at construction).

    It remembers the JSON text of the envelope it built (or refitted) last, which
    :meth:`encoded` hands out so that a store does not encode the same envelope again.

    Args:
        options: Redaction and size caps.
        system: The source backend or system name (``memory``, ``redis``), if known.
        handler_name: The handler's dotted name, if known.
    """

    __slots__ = ("_last", "handler_name", "host", "options", "redactor", "service", "system")

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
        self._last: tuple[dict[str, Any], str] | None = None

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
        too_deep: list[str] = []
        payload, paths, secrets = redactor.redact(
            None if decode_failed else delivery.payload, "payload", cut=too_deep
        )
        headers, header_paths, header_secrets = redactor.redact(
            dict(delivery.headers), "headers", text_pairs=True
        )
        paths += header_paths
        secrets |= header_secrets
        raw = _raw_body(message.raw) if message is not None and decode_failed else None
        if raw is not None and raw["encoding"] == "utf-8":
            raw["data"], raw_paths, raw_secrets = redactor.redact_text(raw["data"], "raw")
            paths += raw_paths
            secrets |= raw_secrets
        # A payload cut at the rendered depth is not the message any more: never replayed.
        truncated: list[str] = ["payload"] if too_deep else []
        # Secrets are masked before anything is cut, so a cut never leaves part of one behind.
        # A credential found in the message is then masked in the traceback too.
        scrub = functools.partial(redactor.mask_text, secrets=secrets, collect=secrets)
        text = scrub(str(exc))
        if len(text) > opts.max_message_chars:
            text = text[: opts.max_message_chars] + f"... [{len(text)} chars]"
            truncated.append("message")
        tb, cut = bounded_traceback(
            exc, opts.max_traceback_frames, opts.max_traceback_bytes, scrub=scrub
        )
        if cut:
            truncated.append("traceback")
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
        before = max(delivery.delivery_count - 1, carried_attempts(delivery.headers))
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
                "in_process": delivery.attempt - before if ran else 0,
                "delivery_count": delivery.delivery_count,
                "total": delivery.attempt if ran else before,
                "history": history,
                # Attempts of earlier deliveries, one record each, with the process that made it
                # (carried in headers by the broker tier of retries).
                "earlier": earlier_attempts(delivery.headers),
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
            "write_failures": {"count": 0, "first": None, "last": None, "recent": []},
            "redacted": paths,
            "truncated": truncated,
        }
        return self.refit(envelope)

    def refit(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """``envelope`` cut down to ``max_envelope_bytes`` again after a change."""
        last = fit_encoded(envelope, self.options.max_envelope_bytes, _KEEP_HEADERS)
        self._last = last
        return last[0]

    def encoded(self, envelope: dict[str, Any]) -> str | None:
        """The compact JSON text of ``envelope`` if it is the one :meth:`build` or
        :meth:`refit` returned last (``None`` otherwise).

        The text is what it was then: only valid while the envelope is unchanged since.
        """
        last = self._last
        if last is not None and last[0] is envelope:
            return last[1]
        return None

    def scrub(self, text: str, delivery: Delivery) -> str:
        """``text`` with the values of ``delivery``'s redacted fields, credentials and pairs of
        redacted names masked (for log lines)."""
        redactor = self.redactor
        secrets = redactor.redact(delivery.payload)[2] | redactor.redact(dict(delivery.headers))[2]
        message = delivery.message
        if message is not None and message.decode_error is not None and message.raw is not None:
            raw = _raw_body(message.raw)
            if raw is not None and raw["encoding"] == "utf-8":
                secrets |= redactor.redact_text(raw["data"])[2]
        return redactor.mask_text(text, secrets)


def _raw_body(raw: bytes | str | None) -> dict[str, str] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return {"encoding": "utf-8", "data": raw}
    try:
        return {"encoding": "utf-8", "data": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"encoding": "base64", "data": base64.b64encode(raw).decode("ascii")}


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
