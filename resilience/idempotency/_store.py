"""What an idempotency store does: claims with a lease, completion records with a TTL."""

from __future__ import annotations

import enum
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import Unsettled

if TYPE_CHECKING:
    from ..delivery import Delivery

__all__ = [
    "ClaimLost",
    "ClaimState",
    "IdempotencyStore",
    "InProgressElsewhere",
    "StoreUnavailable",
]


class ClaimState(enum.Enum):
    """What :meth:`IdempotencyStore.claim` found."""

    CLAIMED = "claimed"
    """The caller holds the claim now: run the handler."""
    COMPLETED = "completed"
    """A completion record exists: the message was processed; do not run it again."""
    BUSY = "busy"
    """Another consumer holds an unexpired claim: it is processing the message right now."""


class InProgressElsewhere(Unsettled):
    """Another consumer held the message's claim for longer than the layer waits; the delivery is
    given back to the broker unacknowledged and comes again later."""


class ClaimLost(Unsettled):
    """The claim expired while the handler ran and another consumer took it over, so the
    completion record was not written (nor, with a transactional store, the handler's effects);
    the delivery is given back and its redelivery finds the other consumer's record."""


class StoreUnavailable(Unsettled):
    """The idempotency store failed (it is down, or the connection to it broke) before the
    handler ran or while writing the completion record: the delivery is given back to the
    broker unacknowledged, after a backoff, and comes again later. Not a handler failure: no
    retry is spent and nothing is dead-lettered because of the store."""


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where claims and completion records live.

    A key is in one of three states: free (no record, or an expired one), claimed by an owner
    until its lease ends, or completed until its TTL ends.
    """

    async def claim(self, key: str, owner: str, lease: float) -> ClaimState:
        """Claim ``key`` for ``owner`` for ``lease`` seconds unless it is claimed or completed.

        Returns:
            :attr:`ClaimState.CLAIMED` when ``owner`` now holds it, otherwise what holds it.
        """
        ...

    def complete(
        self, key: str, owner: str, ttl: float, delivery: Delivery
    ) -> AbstractAsyncContextManager[Any]:
        """A context around the handler: entering yields the store's transaction (what
        :func:`~resilience.idempotency.current_transaction` returns, ``None`` for stores
        without one); a normal exit writes the completion record (kept ``ttl`` seconds) in
        that transaction; an exception leaving the context rolls the transaction back.

        Raises:
            ClaimLost: on exit, ``owner`` no longer holds the claim; nothing was written.
        """
        ...

    async def release(self, key: str, owner: str) -> None:
        """Drop ``owner``'s claim on ``key`` (nothing happens when someone else holds it)."""
        ...
