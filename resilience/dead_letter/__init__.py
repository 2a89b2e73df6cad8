"""Dead-letter routing: envelopes, sinks and stores, the middleware, replay tooling.

When a message ends terminally (retries exhausted, a non-retryable error, an undecodable or
invalid payload, the handler asked for it, the broker's delivery limit, the retry budget) the
:class:`DeadLetterRouter` writes a ``dlq.v1`` envelope to a sink and only then lets the consumer
acknowledge the message; a failed write leaves it unacknowledged, so nothing is lost.

Sinks: :class:`SQLiteStore` (durable, no server; the default), :class:`BackendSink` (publish to
``<key>.dlq`` through any abe backend) and :class:`MemoryStore` (tests). :func:`replay`,
:func:`summarize` and the ``resilience dlq`` command work on stores.
"""

from __future__ import annotations

from .config import DESTINATIONS, DeadLetterConfig, DeadLetterSection, policy_section
from .envelope import (
    DEAD_LETTER_TRACEPARENT_HEADER,
    DEFAULT_REDACT,
    MASK,
    REASONS,
    REPLAY_COUNT_HEADER,
    REPLAY_OF_HEADER,
    SCHEMA,
    STAGES,
    EnvelopeBuilder,
    EnvelopeOptions,
    Redactor,
)
from .middleware import (
    DeadLettered,
    DeadLetterFailed,
    DeadLetterRouter,
    DeadLetterStats,
    InvalidPayload,
    Validator,
)
from .replay import DeadLetterSummary, ReplayReport, describe, replay, replay_headers, summarize
from .sinks import (
    AmbiguousId,
    BackendSink,
    DeadLetterRecord,
    DeadLetterSink,
    DeadLetterStore,
    Filter,
    MemoryStore,
)
from .sqlite import DEFAULT_PATH, SQLiteStore, StoreVersionError

__all__ = [
    "DEAD_LETTER_TRACEPARENT_HEADER",
    "DEFAULT_PATH",
    "DEFAULT_REDACT",
    "DESTINATIONS",
    "MASK",
    "REASONS",
    "REPLAY_COUNT_HEADER",
    "REPLAY_OF_HEADER",
    "SCHEMA",
    "STAGES",
    "AmbiguousId",
    "BackendSink",
    "DeadLetterConfig",
    "DeadLetterFailed",
    "DeadLetterRecord",
    "DeadLetterRouter",
    "DeadLetterSection",
    "DeadLetterSink",
    "DeadLetterStats",
    "DeadLetterStore",
    "DeadLetterSummary",
    "DeadLettered",
    "EnvelopeBuilder",
    "EnvelopeOptions",
    "Filter",
    "InvalidPayload",
    "MemoryStore",
    "Redactor",
    "ReplayReport",
    "SQLiteStore",
    "StoreVersionError",
    "Validator",
    "describe",
    "policy_section",
    "replay",
    "replay_headers",
    "summarize",
]
