"""An in-process idempotency store on the injected clock (tests, single-process consumers)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..clock import Clock, default_clock
from ._store import ClaimLost, ClaimState

if TYPE_CHECKING:
    from ..delivery import Delivery

__all__ = ["MemoryStore"]

_DONE = ""


class MemoryStore:
    """Claims and completion records in a dict; gone when the process ends.

    Args:
        clock: Time source for leases and TTLs (the event loop's by default).

    Attributes:
        records: Key -> ``(owner, expires_at)``; the owner is ``""`` for a completion record.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or default_clock
        self.records: dict[str, tuple[str, float]] = {}

    def _live(self, key: str) -> tuple[str, float] | None:
        record = self.records.get(key)
        if record is not None and record[1] <= self.clock.monotonic():
            del self.records[key]
            return None
        return record

    async def claim(self, key: str, owner: str, lease: float) -> ClaimState:
        """Claim ``key`` (see :meth:`IdempotencyStore.claim`)."""
        record = self._live(key)
        if record is None:
            self.records[key] = (owner, self.clock.monotonic() + lease)
            return ClaimState.CLAIMED
        return ClaimState.COMPLETED if record[0] == _DONE else ClaimState.BUSY

    @contextlib.asynccontextmanager
    async def complete(
        self, key: str, owner: str, ttl: float, delivery: Delivery
    ) -> AsyncIterator[None]:
        """Write the completion record after the handler (see :meth:`IdempotencyStore.complete`).

        Raises:
            ClaimLost: the claim expired and someone else took it.
        """
        yield None
        record = self._live(key)
        if record is not None and record[0] != owner:
            raise ClaimLost(f"the claim on {key!r} was taken over while the handler ran")
        self.records[key] = (_DONE, self.clock.monotonic() + ttl)

    async def release(self, key: str, owner: str) -> None:
        """Drop ``owner``'s claim on ``key``."""
        record = self.records.get(key)
        if record is not None and record[0] == owner:
            del self.records[key]

    def completed(self, key: str) -> bool:
        """Whether a live completion record exists for ``key``."""
        record = self._live(key)
        return record is not None and record[0] == _DONE
