"""The broker tier of retries: the headers a message carries while it waits in the broker.

After its in-process attempts, :class:`~resilience.retry.Retry` hands a message whose failure is
retryable to a :class:`~abe.backends.message_queue.base.DelayingBackend` with the next backoff
delay. The message then carries its retry state in transport headers, so that whichever process
receives it next goes on counting from there:

* :data:`ATTEMPT_HEADER`: attempts made so far (the next delivery makes attempt ``n + 1``).
* :data:`ELAPSED_HEADER`: seconds spent on the message so far, broker waits included (for
  ``max_elapsed``).
* :data:`FIRST_FAILURE_HEADER`: wall-clock time of the first failure.
* :data:`ERROR_HEADER`: the last error, ``Type: message``, with redacted values masked.
* :data:`HISTORY_HEADER`: JSON list of every failed attempt so far, one record each:
  ``{"attempt", "tier", "type", "at", "host", "pid"}``.

``traceparent`` and ``tracestate`` travel unchanged with the other headers.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "ATTEMPT_HEADER",
    "ELAPSED_HEADER",
    "ERROR_HEADER",
    "FIRST_FAILURE_HEADER",
    "HISTORY_HEADER",
    "AttemptLog",
    "carried_attempts",
    "carried_elapsed",
    "earlier_attempts",
    "handover_headers",
]

ATTEMPT_HEADER = "x-retry-attempt"
ELAPSED_HEADER = "x-retry-elapsed"
FIRST_FAILURE_HEADER = "x-retry-first-failure"
ERROR_HEADER = "x-retry-error"
HISTORY_HEADER = "x-retry-history"

MAX_HISTORY = 100
"""Attempt records kept in :data:`HISTORY_HEADER` (the oldest are dropped past it)."""

MAX_ERROR_CHARS = 500
"""Longest error text carried in :data:`ERROR_HEADER`."""

_HOST = socket.gethostname()


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def carried_attempts(headers: Mapping[str, str]) -> int:
    """Attempts made before this delivery, from :data:`ATTEMPT_HEADER` (0 when absent)."""
    value = _number(headers, ATTEMPT_HEADER)
    return 0 if value is None else int(min(value, 2**31 - 1))


def carried_elapsed(headers: Mapping[str, str]) -> float:
    """Seconds spent on the message before this delivery, from :data:`ELAPSED_HEADER`."""
    value = _number(headers, ELAPSED_HEADER)
    return 0.0 if value is None else value


def earlier_attempts(headers: Mapping[str, str]) -> list[dict[str, Any]]:
    """The attempt records of :data:`HISTORY_HEADER` (an unreadable header gives ``[]``)."""
    raw = headers.get(HISTORY_HEADER)
    if not raw:
        return []
    try:
        records = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict)][-MAX_HISTORY:]


class AttemptLog:
    """The failed attempts of one delivery, recorded for the next hand-over."""

    __slots__ = ("records",)

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, attempt: int, tier: str, error_type: str) -> None:
        """Record a failed attempt made by this process now."""
        self.records.append(
            {
                "attempt": attempt,
                "tier": tier,
                "type": error_type,
                "at": time.time(),
                "host": _HOST,
                "pid": os.getpid(),
            }
        )


def handover_headers(
    headers: Mapping[str, str],
    *,
    attempt: int,
    elapsed: float,
    error: BaseException,
    log: AttemptLog,
    scrub: Callable[[str], str] | None,
) -> dict[str, str]:
    """``headers`` with the retry state of a message handed to the broker.

    Args:
        headers: The delivery's transport headers (kept, ``traceparent`` included).
        attempt: Attempts made so far.
        elapsed: Seconds spent so far, the coming broker wait included.
        error: The last failure.
        log: This delivery's failed attempts.
        scrub: Masks redacted values in the error text (``None``: the text is left out).

    Returns:
        The headers to hand over with.
    """
    out = dict(headers)
    history = earlier_attempts(headers) + log.records
    out[ATTEMPT_HEADER] = str(attempt)
    out[ELAPSED_HEADER] = repr(round(elapsed, 6))
    if FIRST_FAILURE_HEADER not in out and history:
        out[FIRST_FAILURE_HEADER] = repr(history[0]["at"])
    text = type(error).__qualname__
    if scrub is not None:
        message = scrub(str(error))
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + f"... [{len(message)} chars]"
        text = f"{text}: {message}"
    out[ERROR_HEADER] = text
    out[HISTORY_HEADER] = json.dumps(history[-MAX_HISTORY:], separators=(",", ":"))
    return out
