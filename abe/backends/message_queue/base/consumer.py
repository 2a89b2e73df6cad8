"""The consumer contract: a PEP 544 protocol that runtimes implement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["EventConsumer"]


@runtime_checkable
class EventConsumer(Protocol):
    """Something that feeds messages from a backend to an async handler.

    Implementations respect cancellation (``asyncio.CancelledError`` propagates), log other
    exceptions, and make :meth:`shutdown` idempotent.
    """

    async def run(self, handler: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Consume messages and await ``handler`` for each payload until stopped."""
        ...

    async def shutdown(self) -> None:
        """Stop consuming; safe to call repeatedly and before :meth:`run`."""
        ...
