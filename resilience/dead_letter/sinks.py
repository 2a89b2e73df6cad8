"""Where dead letters go: the sink and store protocols, a backend sink and an in-memory store.

A :class:`DeadLetterSink` only writes. A :class:`DeadLetterStore` also lists, shows, marks
replays and purges, which is what the replay tooling and ``resilience dlq`` need; the durable
:class:`~resilience.dead_letter.sqlite.SQLiteStore` and the :class:`MemoryStore` are stores.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from abe.backends.message_queue.base.extensions import (
    DeadLetteringBackend,
    HeaderPublishingBackend,
)

from .envelope import SCHEMA

if TYPE_CHECKING:
    from abe.backends.message_queue.base import MessageQueueBackend

    from ..delivery import Delivery

__all__ = [
    "AmbiguousId",
    "BackendSink",
    "DeadLetterRecord",
    "DeadLetterSink",
    "DeadLetterStore",
    "Filter",
    "MemoryStore",
]


class AmbiguousId(LookupError):
    """An id prefix matches more than one dead letter."""


@runtime_checkable
class DeadLetterSink(Protocol):
    """Writes envelopes somewhere durable."""

    @property
    def name(self) -> str:
        """Where envelopes go, for logs and events (``sqlite:/path``, ``backend:<key>.dlq``)."""
        ...

    async def write(self, envelope: Mapping[str, Any], delivery: Delivery | None = None) -> None:
        """Store ``envelope``; return only once the write is confirmed.

        Args:
            envelope: A ``dlq.v1`` envelope.
            delivery: The delivery it describes (a backend sink routes and settles by it).

        Raises:
            Exception: the write failed; the delivery must not be acknowledged.
        """
        ...


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One stored envelope and its replay bookkeeping.

    Attributes:
        id: The envelope id.
        envelope: The ``dlq.v1`` envelope.
        stored_at: When the store accepted it (wall-clock seconds).
        replayed_at: When it was last replayed, or ``None``.
        replay_target: The key it was last replayed to.
        replays: How many times it was replayed from this store.
    """

    id: str
    envelope: Mapping[str, Any]
    stored_at: float
    replayed_at: float | None = None
    replay_target: str | None = None
    replays: int = 0

    @property
    def reason(self) -> str:
        """The dead-letter reason."""
        return str(self.envelope["error"]["reason"])

    @property
    def stage(self) -> str:
        """``decode`` or ``handle``."""
        return str(self.envelope["error"]["stage"])

    @property
    def error_type(self) -> str:
        """The exception's dotted name (builtins by bare name)."""
        return str(self.envelope["error"]["type"])

    @property
    def key(self) -> str | None:
        """The source key."""
        key = self.envelope["source"]["key"]
        return None if key is None else str(key)

    @property
    def dead_lettered_at(self) -> float:
        """When the message was dead-lettered (wall-clock seconds)."""
        return float(self.envelope["dead_lettered_at"])

    @property
    def replay_count(self) -> int:
        """How many times the message had been replayed before it was dead-lettered."""
        return int(self.envelope.get("replay_count", 0))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return dataclasses.asdict(self) | {"envelope": dict(self.envelope)}


def _short_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class Filter:
    """Selects dead letters; empty fields match everything, several values in one field OR.

    Args:
        ids: Exact envelope ids.
        reasons: Dead-letter reasons (``retries_exhausted``, ...).
        error_types: Exception names, dotted (``myapp.errors.Invalid``) or bare (``Invalid``).
        keys: Source keys.
        since: Dead-lettered at or after this wall-clock time.
        until: Dead-lettered before this wall-clock time.
        replayed: ``True`` only replayed ones, ``False`` only never-replayed ones.
    """

    ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    error_types: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    replayed: bool | None = None

    def __post_init__(self) -> None:
        for name in ("ids", "reasons", "error_types", "keys"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def matches(self, record: DeadLetterRecord) -> bool:
        """Whether ``record`` is selected."""
        if self.ids and record.id not in self.ids:
            return False
        if self.reasons and record.reason not in self.reasons:
            return False
        if self.error_types:
            full = record.error_type
            if full not in self.error_types and _short_type(full) not in self.error_types:
                return False
        if self.keys and record.key not in self.keys:
            return False
        at = record.dead_lettered_at
        if self.since is not None and at < self.since:
            return False
        if self.until is not None and at >= self.until:
            return False
        return self.replayed is None or (record.replayed_at is not None) is self.replayed


@runtime_checkable
class DeadLetterStore(DeadLetterSink, Protocol):
    """A sink that can also be queried: what the replay tooling works on."""

    async def find(
        self, where: Filter | None = None, *, limit: int | None = None, newest_first: bool = False
    ) -> list[DeadLetterRecord]:
        """Records matching ``where``, oldest first (newest first when asked)."""
        ...

    async def get(self, id_or_prefix: str) -> DeadLetterRecord | None:
        """The record with this id, or the only one whose id starts with it.

        Raises:
            AmbiguousId: several ids start with ``id_or_prefix``.
        """
        ...

    async def mark_replayed(self, id: str, *, target: str, at: float | None = None) -> bool:
        """Record a replay of ``id`` to ``target``; ``False`` when there is no such record."""
        ...

    async def purge(self, where: Filter | None = None) -> int:
        """Delete the records matching ``where`` (all when ``None``); returns how many."""
        ...

    async def counts(self, where: Filter | None = None) -> dict[str, int]:
        """Number of records matching ``where``, by reason."""
        ...


class MemoryStore:
    """A dead-letter store in process memory, for tests (and the ``memory`` destination).

    Assert on :attr:`envelopes`; set :attr:`failure` to an exception to make writes fail (the
    sink-failure path) and back to ``None`` to let them succeed again.
    """

    name = "memory"

    def __init__(self) -> None:
        self._records: dict[str, DeadLetterRecord] = {}
        self.failure: BaseException | None = None
        """When set, :meth:`write` raises it (a broken store)."""
        self.write_attempts = 0
        """Writes attempted, failed ones included."""

    @property
    def envelopes(self) -> list[Mapping[str, Any]]:
        """Every stored envelope, oldest first."""
        return [r.envelope for r in self._records.values()]

    def __len__(self) -> int:
        return len(self._records)

    async def write(self, envelope: Mapping[str, Any], delivery: Delivery | None = None) -> None:
        """Store ``envelope`` (an envelope id stored twice is kept once)."""
        self.write_attempts += 1
        if self.failure is not None:
            raise self.failure
        record_id = str(envelope["id"])
        if record_id not in self._records:
            self._records[record_id] = DeadLetterRecord(record_id, envelope, time.time())

    async def find(
        self, where: Filter | None = None, *, limit: int | None = None, newest_first: bool = False
    ) -> list[DeadLetterRecord]:
        """Records matching ``where``."""
        records: Iterable[DeadLetterRecord] = self._records.values()
        if newest_first:
            records = reversed(list(records))
        selected = [r for r in records if where is None or where.matches(r)]
        return selected if limit is None else selected[:limit]

    async def get(self, id_or_prefix: str) -> DeadLetterRecord | None:
        """The record by id or unique id prefix."""
        record = self._records.get(id_or_prefix)
        if record is not None:
            return record
        found = [r for i, r in self._records.items() if i.startswith(id_or_prefix)]
        if len(found) > 1:
            raise AmbiguousId(f"{id_or_prefix!r} matches {len(found)} dead letters")
        return found[0] if found else None

    async def mark_replayed(self, id: str, *, target: str, at: float | None = None) -> bool:
        """Record a replay of ``id``."""
        record = self._records.get(id)
        if record is None:
            return False
        self._records[id] = dataclasses.replace(
            record,
            replayed_at=time.time() if at is None else at,
            replay_target=target,
            replays=record.replays + 1,
        )
        return True

    async def purge(self, where: Filter | None = None) -> int:
        """Delete matching records."""
        doomed = [r.id for r in await self.find(where)]
        for record_id in doomed:
            del self._records[record_id]
        return len(doomed)

    async def counts(self, where: Filter | None = None) -> dict[str, int]:
        """Matching records by reason."""
        result: dict[str, int] = {}
        for record in await self.find(where):
            result[record.reason] = result.get(record.reason, 0) + 1
        return result

    async def close(self) -> None:
        """Nothing to release."""


class BackendSink:
    """Publishes envelopes through an abe backend to a dead-letter key (``<key>.dlq``).

    With a backend implementing
    :class:`~abe.backends.message_queue.base.DeadLetteringBackend` the write and the
    acknowledgement of the source message are one atomic step; otherwise the envelope is
    published (with headers when the backend supports them) and the consumer acknowledges the
    source message afterwards. The consumer must not read the dead-letter key itself.

    Args:
        backend: The backend to publish through (usually the one being consumed).
        key_suffix: Appended to the source key to name the dead-letter key.
        key: A fixed dead-letter key for every message instead.
        fallback_key: Used when a delivery has no source key.
    """

    def __init__(
        self,
        backend: MessageQueueBackend,
        *,
        key_suffix: str = ".dlq",
        key: str | None = None,
        fallback_key: str = "dead-letters",
    ) -> None:
        if not key and not key_suffix:
            raise ValueError("BackendSink needs a key_suffix or a fixed key")
        self.backend = backend
        self.key_suffix = key_suffix
        self.key = key
        self.fallback_key = fallback_key
        self._atomic = isinstance(backend, DeadLetteringBackend)
        self._headers = isinstance(backend, HeaderPublishingBackend)

    @property
    def name(self) -> str:
        """``backend:<key>`` or ``backend:<key>.dlq``."""
        return f"backend:{self.key or '<key>' + self.key_suffix}"

    def destination(self, delivery: Delivery | None) -> str:
        """The dead-letter key for ``delivery``."""
        if self.key:
            return self.key
        if delivery is not None and delivery.key:
            return f"{delivery.key}{self.key_suffix}"
        return self.fallback_key

    async def write(self, envelope: Mapping[str, Any], delivery: Delivery | None = None) -> None:
        """Publish ``envelope`` to the dead-letter key (atomically with the ack when possible)."""
        destination = self.destination(delivery)
        message = delivery.message if delivery is not None else None
        if self._atomic and message is not None:
            await self.backend.dead_letter(  # type: ignore[attr-defined]
                message, destination, envelope
            )
        elif self._headers:
            headers = {"x-dead-letter-schema": SCHEMA, "x-dead-letter-id": str(envelope["id"])}
            await self.backend.publish_message(  # type: ignore[attr-defined]
                destination, dict(envelope), headers=headers
            )
        else:
            await self.backend.publish(destination, dict(envelope))
