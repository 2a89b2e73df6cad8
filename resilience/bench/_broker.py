"""The simulated at-least-once broker of the redelivery scenarios.

An in-memory backend that behaves like a broker with a visibility timeout: every delivery not
acknowledged within the scenario's :meth:`~.scenarios.Scenario.redelivery_timeout` is handed
out again (with its delivery count raised) even if its first consumer is still running it, and
the acknowledgements the scenario says are lost (:meth:`~.scenarios.Scenario.ack_lost`) never
settle their delivery, so it comes back when that timeout ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable

from abe.backends.message_queue.base import InboundMessage
from abe.backends.message_queue.service.memory import (
    MemoryBackend,
    MemoryChannel,
    MemoryDeliveries,
)

from .scenarios import Scenario

__all__ = ["RedeliveringBackend"]


class _Deliveries:
    """The backend's deliveries, each starting its visibility timer when handed out."""

    __slots__ = ("_backend", "_inner")

    def __init__(self, inner: MemoryDeliveries, backend: RedeliveringBackend) -> None:
        self._inner = inner
        self._backend = backend

    def __aiter__(self) -> _Deliveries:
        return self

    async def __anext__(self) -> InboundMessage:
        return self._backend.handed_out(await self._inner.__anext__())

    def next_nowait(self) -> InboundMessage | None:
        message = self._inner.next_nowait()
        return None if message is None else self._backend.handed_out(message)

    async def aclose(self) -> None:
        await self._inner.aclose()


class RedeliveringBackend(MemoryBackend):
    """A private in-memory backend that redelivers like a broker with a visibility timeout.

    Args:
        scenario: Decides the visibility timeout and which acknowledgements are lost.
        keys: The keys its deliveries read.

    Attributes:
        redelivered: Deliveries handed out again (visibility timeouts, releases).
        lost_acks: Acknowledgements that never reached the broker.
    """

    def __init__(self, scenario: Scenario, *, keys: Iterable[str]) -> None:
        super().__init__(MemoryChannel(), keys=keys)
        self._scenario = scenario
        self._timeout = scenario.redelivery_timeout()
        self.redelivered = 0
        self.lost_acks = 0

    def deliveries(self, *, group: str | None = None) -> _Deliveries:  # type: ignore[override]
        """Deliveries with a visibility timeout (see the class)."""
        return _Deliveries(super().deliveries(group=group), self)

    def handed_out(self, message: InboundMessage) -> InboundMessage:
        """Count a redelivery and start the delivery's visibility timer."""
        if message.delivery_count > 1:
            self.redelivered += 1
        if self._timeout is not None:
            asyncio.get_running_loop().call_later(self._timeout, self._expire, message)
        return message

    def _expire(self, message: InboundMessage) -> None:
        if not any(held is message for held in self.channel.unacked()):
            return  # acknowledged or given back meanwhile
        again = dataclasses.replace(message, delivery_count=message.delivery_count + 1, group=None)
        self.channel.put(again, self.channel.next_id(), front=True)

    async def ack(self, message: InboundMessage) -> None:
        """Acknowledge, unless the scenario loses this acknowledgement."""
        if self._scenario.ack_lost(message.message_id, message.delivery_count):
            self.lost_acks += 1
            return
        await super().ack(message)

    def ack_nowait(self, message: InboundMessage) -> None:
        """As :meth:`ack`, without a coroutine."""
        if self._scenario.ack_lost(message.message_id, message.delivery_count):
            self.lost_acks += 1
            return
        super().ack_nowait(message)

    def holds(self, key: str) -> bool:
        """Whether a message of ``key`` is still queued, handed out unacknowledged or delayed."""
        waiting = (*self.peek(key), *self.unacked(), *self.delayed())
        return any(m.key == key for m in waiting)
