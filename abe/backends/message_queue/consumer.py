"""The default consumer runtime: an asyncio loop over ``backend.consume()``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .base import EventConsumer, MessageQueueBackend

__all__ = ["AsyncLoopConsumer"]

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]


class AsyncLoopConsumer(EventConsumer):
    """Feeds every payload from ``backend.consume(group=group)`` to an async handler.

    Exceptions raised by the handler are logged with their traceback and the loop goes on;
    ``asyncio.CancelledError`` propagates. Subclasses change how one run consumes by overriding
    :meth:`_consume` and keep the lifecycle rules of :meth:`run` and :meth:`shutdown`.

    Args:
        backend: The backend to consume from, for example the one ``load_backend()`` returns.
        group: Consumer group forwarded to ``backend.consume()``.
    """

    def __init__(self, backend: MessageQueueBackend, group: str | None = None) -> None:
        self.backend = backend
        self.group = group
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def run(self, handler: Handler) -> None:
        """Consume until the backend's iterator ends, the task is cancelled, or shutdown.

        The consumer counts as running from the first ``run()`` until :meth:`shutdown`, even
        after the backend's iterator has ended: another ``run()`` in that time returns at once
        without calling ``consume()`` again (the published behaviour). Call :meth:`shutdown`
        before running the consumer again.

        Args:
            handler: Awaited with every payload the backend yields.

        Raises:
            asyncio.CancelledError: the consumer task was cancelled (by :meth:`shutdown`, by the
                handler, or because the caller's task was cancelled).
        """
        if self._running:
            return
        self._running = True
        self._task = asyncio.create_task(self._consume(handler))
        await self._task

    async def _consume(self, handler: Handler) -> None:
        """Iterate the backend and await the handler per payload (the overridable core)."""
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling
        async for message in self.backend.consume(group=self.group):
            try:
                await handler(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancelling():
                    raise  # the handler turned our cancellation into an error: stop, don't loop
                logger.error("Error processing message: %s", exc, exc_info=True)
            if cancelling():
                # The handler swallowed our cancellation; honour it or shutdown() waits forever.
                raise asyncio.CancelledError

    async def shutdown(self) -> None:
        """Cancel the consumer task and reset the state; idempotent and safe before run().

        Logs at DEBUG level what it does (the published messages: "Shutting down
        AsyncLoopConsumer", "Cancelling consumer task", "Consumer task cancelled successfully" or
        "Consumer task was already completed", then "Consumer shutdown complete"), and at WARNING
        level an exception the task raised while being cancelled. Never raises that exception.

        Raises:
            asyncio.CancelledError: the task calling ``shutdown()`` was itself cancelled; the
                state is reset first.
        """
        task = self._task
        if not self._running or task is None:
            logger.debug("Shutdown called on consumer that is not running")
            self._running = False
            self._task = None
            return
        logger.debug("Shutting down AsyncLoopConsumer")
        self._running = False
        if not task.done():
            logger.debug("Cancelling consumer task")
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # Shutdown itself is being cancelled: honour that after resetting state.
                    self._forget(task)
                    raise
                logger.debug("Consumer task cancelled successfully")
            except TimeoutError as exc:
                logger.warning("Timeout during consumer shutdown: %s", exc, exc_info=True)
            except Exception as exc:
                logger.warning("Unexpected error during consumer shutdown: %s", exc, exc_info=True)
        else:
            logger.debug("Consumer task was already completed")
        self._forget(task)
        logger.debug("Consumer shutdown complete")

    def _forget(self, task: asyncio.Task[None]) -> None:
        # A run() started while shutdown() awaited ``task`` owns _task now; keep tracking it.
        if self._task is task:
            self._task = None
