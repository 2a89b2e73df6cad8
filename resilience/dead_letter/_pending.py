"""Dead-letter writes that failed: each message's write backoff and the failure it was for.

When the destination is down, the router retries the write of one message a few times on a
growing, jittered backoff, then lets the message go unacknowledged (it is delivered again).
What it learnt is kept here, per message, so that the next delivery of the same message goes
on with the backoff where it stopped (no hot loop of redeliveries) and, once the message is
past its attempt limit, is still written with the failure that sent it to the destination and
not as ``DeliveryLimitExceeded``.

The memory is per process and bounded (least recently used entries are forgotten first): a
message redelivered to another process, or forgotten, starts over as if it had never failed a
write.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..delivery import Delivery

__all__ = ["MAX_PENDING", "MAX_RECENT", "PendingWrite", "PendingWrites"]

MAX_PENDING = 1024
"""Messages whose failed write a router remembers at most."""

MAX_RECENT = 10
"""Failed writes listed one by one in an envelope's ``write_failures`` (the newest)."""


def identity(delivery: Delivery) -> tuple[str, str] | None:
    """What recognises a message across deliveries: its key and id (``None`` without an id)."""
    message_id = delivery.message_id
    if message_id is None:
        return None
    return (delivery.key or "", message_id)


@dataclass(slots=True)
class PendingWrite:
    """One message whose dead-letter write failed.

    Attributes:
        envelope_id: The id its envelope keeps on every try (a store that took a write it could
            not confirm keeps one copy).
        error: The envelope's ``error`` section: the failure that sent it to the destination
            (reason, stage, type, message, traceback), already masked and capped.
        history: The envelope's ``attempts.history`` for that failure.
        in_process: The envelope's ``attempts.in_process`` for that failure.
        count: Failed writes so far.
        first: Wall-clock time of the first failed write.
        last: Wall-clock time of the latest failed write.
        recent: The newest failed writes, ``{"at", "type", "message"}`` each.
        next_at: Monotonic time before which no write of it is tried again.
    """

    envelope_id: str
    error: dict[str, Any]
    history: list[dict[str, Any]]
    in_process: int
    count: int = 0
    first: float | None = None
    last: float | None = None
    recent: list[dict[str, Any]] = field(default_factory=list)
    next_at: float = 0.0

    @classmethod
    def of(cls, envelope: dict[str, Any]) -> PendingWrite:
        """A new entry for the failure ``envelope`` describes."""
        entry = cls(str(envelope["id"]), {}, [], 0)
        entry.remember(envelope)
        return entry

    def remember(self, envelope: dict[str, Any]) -> None:
        """Keep the failure ``envelope`` describes (replacing the one kept before)."""
        self.error = dict(envelope["error"])
        self.history = [dict(entry) for entry in envelope["attempts"]["history"]]
        self.in_process = envelope["attempts"]["in_process"]

    def failed(self, at: float, error_type: str, message: str) -> None:
        """Record one failed write at wall-clock time ``at``."""
        self.count += 1
        if self.first is None:
            self.first = at
        self.last = at
        self.recent.append({"at": at, "type": error_type, "message": message})
        if len(self.recent) > MAX_RECENT:
            del self.recent[0]

    def section(self) -> dict[str, Any]:
        """The envelope's ``write_failures`` section."""
        return {
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "recent": [dict(entry) for entry in self.recent],
        }

    def restore(self, envelope: dict[str, Any]) -> None:
        """Put the remembered failure back into ``envelope`` (built for a delivery that was
        only past its attempt limit), keeping that delivery's own history entries too."""
        envelope["error"] = dict(self.error)
        attempts = envelope["attempts"]
        known = {entry["type"] for entry in self.history}
        attempts["history"] = [
            *(dict(entry) for entry in self.history),
            *(entry for entry in attempts["history"] if entry["type"] not in known),
        ]
        attempts["in_process"] = self.in_process


class PendingWrites:
    """The messages of one router whose write failed, least recently used first out."""

    __slots__ = ("_entries", "limit")

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self._entries: OrderedDict[tuple[str, str], PendingWrite] = OrderedDict()
        self.limit = limit

    def get(self, key: tuple[str, str]) -> PendingWrite | None:
        """The entry of message ``key`` (marked as recently used), if any."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, str], entry: PendingWrite) -> None:
        """Remember ``entry`` for message ``key``, forgetting the oldest beyond the limit."""
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def pop(self, key: tuple[str, str]) -> PendingWrite | None:
        """Forget message ``key`` (its write succeeded)."""
        return self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
