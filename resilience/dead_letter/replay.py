"""Replaying dead letters back to a queue, and summarising a store.

:func:`replay` republishes each selected envelope's original payload with headers that carry the
replay count (``x-replay-count``), the envelope id (``x-replay-of``) and the original trace
context (``traceparent``), then marks the envelope as replayed. It is idempotent per envelope
id (already-replayed envelopes are skipped unless ``force``), refuses messages that have been
replayed ``max_replays`` times already (so a message that keeps failing cannot loop forever),
and never replays a payload the envelope no longer holds intact (redacted fields, a truncated
or undecodable body).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from abe.backends.message_queue.base.extensions import HeaderPublishingBackend

from ..clock import Clock, default_clock
from .envelope import (
    DEAD_LETTER_TRACEPARENT_HEADER,
    MASK,
    REPLAY_COUNT_HEADER,
    REPLAY_OF_HEADER,
)
from .sinks import DeadLetterRecord, DeadLetterStore, Filter

if TYPE_CHECKING:
    from abe.backends.message_queue.base import MessageQueueBackend

__all__ = [
    "DeadLetterSummary",
    "ReplayReport",
    "describe",
    "replay",
    "replay_headers",
    "summarize",
]

SKIP_REASONS = (
    "already_replayed",
    "replay_limit",
    "redacted",
    "truncated",
    "undecodable",
    "no_key",
)
"""Why :func:`replay` can skip an envelope."""


@dataclass(slots=True)
class ReplayReport:
    """What :func:`replay` did.

    Attributes:
        dry_run: Nothing was published or marked.
        selected: Envelopes matching the filter.
        replayed: ``(envelope id, target key)`` published (or, in a dry run, that would be).
        skipped: Envelope id -> one of :data:`SKIP_REASONS`.
        failed: Envelope id -> the publish error; replay stops at the first one.
        headers_dropped: The backend cannot publish headers, so replay counts and trace links
            were not carried.
    """

    dry_run: bool
    selected: int = 0
    replayed: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    headers_dropped: bool = False

    @property
    def ok(self) -> bool:
        """No publish failed."""
        return not self.failed

    def skipped_by_reason(self) -> dict[str, int]:
        """How many envelopes were skipped, per skip reason."""
        return dict(Counter(self.skipped.values()))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return {
            "dry_run": self.dry_run,
            "selected": self.selected,
            "replayed": [{"id": i, "key": k} for i, k in self.replayed],
            "skipped": self.skipped,
            "skipped_by_reason": self.skipped_by_reason(),
            "failed": self.failed,
            "headers_dropped": self.headers_dropped,
        }


def replay_headers(envelope: Mapping[str, Any]) -> dict[str, str]:
    """Headers for republishing ``envelope``'s payload.

    The original headers (minus redacted ones and earlier replay bookkeeping) plus the next
    replay count, the envelope id, the original ``traceparent``/``tracestate`` and the
    ``traceparent`` of the processing that dead-lettered it.
    """
    own = {REPLAY_COUNT_HEADER, REPLAY_OF_HEADER, DEAD_LETTER_TRACEPARENT_HEADER}
    headers = {
        str(k): str(v)
        for k, v in (envelope.get("headers") or {}).items()
        if v != MASK and str(k).lower() not in own
    }
    headers[REPLAY_COUNT_HEADER] = str(int(envelope.get("replay_count", 0)) + 1)
    headers[REPLAY_OF_HEADER] = str(envelope["id"])
    trace = envelope.get("trace") or {}
    original = trace.get("original")
    if original and original.get("traceparent"):
        headers["traceparent"] = str(original["traceparent"])
        if original.get("tracestate"):
            headers["tracestate"] = str(original["tracestate"])
    processing = trace.get("processing")
    if processing and processing.get("traceparent"):
        headers[DEAD_LETTER_TRACEPARENT_HEADER] = str(processing["traceparent"])
    return headers


def _skip_reason(
    record: DeadLetterRecord, *, force: bool, max_replays: int, allow_redacted: bool
) -> str | None:
    env = record.envelope
    if record.replayed_at is not None and not force:
        return "already_replayed"
    if record.replay_count >= max_replays:
        return "replay_limit"
    truncated = env.get("truncated") or ()
    if "payload" in truncated or "raw" in truncated:
        return "truncated"
    if env.get("payload") is None:
        return "undecodable"
    if not allow_redacted and any(p.startswith("payload") for p in env.get("redacted") or ()):
        return "redacted"
    return None


async def replay(
    store: DeadLetterStore,
    backend: MessageQueueBackend | None,
    *,
    where: Filter | None = None,
    to_key: str | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    max_replays: int = 3,
    force: bool = False,
    allow_redacted: bool = False,
    limit: int | None = None,
    clock: Clock | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> ReplayReport:
    """Republish dead letters from ``store`` through ``backend``.

    Args:
        store: The dead-letter store to read.
        backend: Where to publish (any abe backend; headers need
            :class:`~abe.backends.message_queue.base.HeaderPublishingBackend`); may be ``None``
            for a dry run.
        where: Which envelopes (all when ``None``).
        to_key: Publish to this key instead of each envelope's source key.
        dry_run: Only report what would be replayed.
        rate: At most this many messages per second (``None``: as fast as possible).
        max_replays: Refuse messages already replayed this many times (replay-loop stop).
        force: Replay envelopes that were replayed before, too.
        allow_redacted: Replay payloads with masked fields (the mask is published as is).
        limit: Consider at most this many envelopes (oldest first).
        clock: Time source for the rate limit.
        progress: Called with ``(done, total)`` after each envelope.

    Returns:
        The :class:`ReplayReport`; replay stops at the first publish failure (see ``failed``).

    Raises:
        ValueError: ``rate`` or ``max_replays`` is out of range, or no backend was given for
            a real run.
    """
    if backend is None and not dry_run:
        raise ValueError("replay needs a backend unless dry_run=True")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 messages per second, got {rate!r}")
    if isinstance(max_replays, bool) or not isinstance(max_replays, int) or max_replays < 0:
        raise ValueError(f"max_replays must be an integer >= 0, got {max_replays!r}")
    clock = clock or default_clock
    records = await store.find(where, limit=limit)
    report = ReplayReport(dry_run=dry_run, selected=len(records))
    report.headers_dropped = not dry_run and not isinstance(backend, HeaderPublishingBackend)
    interval = None if rate is None else 1.0 / rate
    next_at: float | None = None
    total = len(records)
    for done, record in enumerate(records, 1):
        skip = _skip_reason(
            record, force=force, max_replays=max_replays, allow_redacted=allow_redacted
        )
        target = to_key or record.key
        if skip is None and not target:
            skip = "no_key"
        if skip is not None:
            report.skipped[record.id] = skip
        elif dry_run:
            report.replayed.append((record.id, str(target)))
        else:
            assert backend is not None
            assert target is not None
            if interval is not None:
                now = clock.monotonic()
                if next_at is not None and next_at > now:
                    await clock.sleep(next_at - now)
                    now = next_at
                next_at = now + interval
            try:
                await _publish(backend, target, record.envelope)
            except Exception as exc:
                report.failed[record.id] = f"{type(exc).__name__}: {exc}"
                break
            await store.mark_replayed(record.id, target=target, at=time.time())
            report.replayed.append((record.id, target))
        if progress is not None:
            progress(done, total)
    return report


async def _publish(backend: MessageQueueBackend, key: str, envelope: Mapping[str, Any]) -> None:
    payload = dict(envelope["payload"])
    if isinstance(backend, HeaderPublishingBackend):
        await backend.publish_message(key, payload, headers=replay_headers(envelope))
    else:
        await backend.publish(key, payload)


@dataclass(frozen=True, slots=True)
class DeadLetterSummary:
    """What a store holds.

    Attributes:
        total: Envelopes stored.
        pending: Of those, never replayed.
        by_reason: Envelopes per reason.
        destination: The store's name (``sqlite:/path``).
    """

    total: int
    pending: int
    by_reason: Mapping[str, int]
    destination: str


async def summarize(store: DeadLetterStore, where: Filter | None = None) -> DeadLetterSummary:
    """Count the envelopes in ``store`` (matching ``where``) by reason.

    Returns:
        The :class:`DeadLetterSummary`.
    """
    by_reason = await store.counts(where)
    pending = sum((await store.counts(replace(where or Filter(), replayed=False))).values())
    return DeadLetterSummary(sum(by_reason.values()), pending, by_reason, store.name)


def describe(summary: DeadLetterSummary, *, db: str | None = None) -> list[str]:
    """Human lines for ``summary``, with the commands that list and replay the dead letters.

    Args:
        summary: From :func:`summarize`.
        db: The store path to put in the commands (omitted when it is the default).

    Returns:
        Lines without trailing newlines; one line when nothing was dead-lettered.
    """
    if not summary.total:
        return ["No dead letters."]
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(summary.by_reason.items()))
    option = f" --db {db}" if db else ""
    return [
        f"Dead letters: {summary.total} ({reasons}); {summary.pending} not replayed yet, "
        f"stored in {summary.destination.removeprefix('sqlite:')}",
        f"  list them:    resilience dlq list{option}",
        f"  inspect one:  resilience dlq show{option} ID",
        f"  replay them:  resilience dlq replay{option} --dry-run   (then without --dry-run,",
        "                with QUEUE_BACKEND naming the broker your consumers read)",
    ]
