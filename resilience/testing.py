"""Helpers for testing code that uses this package (public API).

* :class:`~resilience.clock.FakeClock`: virtual time that records every sleep.
* :func:`set_testing` / :func:`zero_waits`: zero every retry wait in the process, so users' own
  tests run retries instantly while attempt counting and classification stay real.
* :func:`capture_events`: collect the event records a consumer or pipeline emits.
* :func:`capture_logs`: collect the log lines of the ``resilience`` and ``abe`` loggers as
  dicts (``event``, ``log_level``, ``logger`` and the structured fields).
* :class:`Outcomes`: a listener that tallies settled messages by outcome for assertions.
* :class:`~resilience.dead_letter.MemoryStore`: an in-memory dead-letter store to assert on
  (``store.envelopes``), which can be told to fail (``store.failure = OSError(...)``).
* :func:`run_until_settled`: run a :class:`~resilience.consumer.ResilientConsumer` until a given
  number of messages is settled, then shut it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from .clock import FakeClock
from .dead_letter import MemoryStore
from .events import EventBus, MessageSettled, Outcome
from .retry import testing_mode

if TYPE_CHECKING:
    from .consumer import ResilientConsumer
    from .types import Handler

__all__ = [
    "FakeClock",
    "MemoryStore",
    "Outcomes",
    "capture_events",
    "capture_logs",
    "run_until_settled",
    "set_testing",
    "zero_waits",
]

E = TypeVar("E")


def set_testing(enabled: bool = True) -> None:
    """Turn zero-wait testing mode on or off for the whole process.

    In testing mode every retry wait is 0 seconds (attempt limits, classification, budgets and
    timeouts behave as configured).
    """
    testing_mode.zero_waits = bool(enabled)


@contextlib.contextmanager
def zero_waits(enabled: bool = True) -> Iterator[None]:
    """:func:`set_testing` for the duration of a ``with`` block, restoring the previous mode."""
    previous = testing_mode.zero_waits
    set_testing(enabled)
    try:
        yield
    finally:
        testing_mode.zero_waits = previous


@contextlib.contextmanager
def capture_events(bus: EventBus, kind: type[E] | None = None) -> Iterator[list[E]]:
    """Collect the events emitted on ``bus`` (only those of type ``kind`` when given)."""
    captured: list[Any] = []

    def listener(event: object) -> None:
        if kind is None or isinstance(event, kind):
            captured.append(event)

    unsubscribe = bus.subscribe(listener)
    try:
        yield captured
    finally:
        unsubscribe()


_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _Collector(logging.Handler):
    def __init__(self, entries: list[dict[str, Any]]) -> None:
        super().__init__(logging.DEBUG)
        self.entries = entries

    def emit(self, record: logging.LogRecord) -> None:
        fields = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}
        entry: dict[str, Any] = {
            "event": record.getMessage(),
            "log_level": record.levelname.lower(),
            "logger": record.name,
        }
        entry.update(fields)
        self.entries.append(entry)


@contextlib.contextmanager
def capture_logs() -> Iterator[list[dict[str, Any]]]:
    """Collect every log line of the ``resilience`` and ``abe`` loggers, at every level.

    The library logs through stdlib ``logging`` (structlog events included), so this plays the
    part of ``structlog.testing.capture_logs`` for it. The loggers' levels are lowered to DEBUG
    for the block and restored afterwards; handlers the application configured still receive
    what they received before.

    Yields:
        A list that fills with one dict per line: ``event`` (the message), ``log_level``,
        ``logger`` and the line's structured fields.
    """
    entries: list[dict[str, Any]] = []
    collector = _Collector(entries)
    loggers = [logging.getLogger("resilience"), logging.getLogger("abe")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(collector)
        logger.setLevel(logging.DEBUG)
    try:
        yield entries
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(collector)
            logger.setLevel(level)


class Outcomes:
    """Tallies :class:`~resilience.events.MessageSettled` events; subscribe it to a bus.

    Example::

        outcomes = Outcomes()
        consumer.events.subscribe(outcomes)
        ...
        assert outcomes.counts[Outcome.DEAD_LETTERED] == 0
    """

    def __init__(self) -> None:
        self.counts: Counter[Outcome] = Counter()
        self.settled: list[MessageSettled] = []
        self._changed = asyncio.Event()

    def __call__(self, event: object) -> None:
        if isinstance(event, MessageSettled):
            self.counts[event.outcome] += 1
            self.settled.append(event)
            self._changed.set()

    @property
    def total(self) -> int:
        """Messages settled so far."""
        return len(self.settled)

    async def wait_for(self, total: int) -> None:
        """Wait until at least ``total`` messages are settled."""
        while self.total < total:
            self._changed.clear()
            await self._changed.wait()


async def run_until_settled(consumer: ResilientConsumer, handler: Handler, count: int) -> Outcomes:
    """Run ``consumer`` with ``handler`` until ``count`` messages are settled, then stop it.

    Returns:
        The tally of outcomes.

    Raises:
        Exception: whatever ``consumer.run`` raised before ``count`` messages settled.
    """
    outcomes = Outcomes()
    unsubscribe = consumer.events.subscribe(outcomes)
    task = asyncio.create_task(consumer.run(handler))
    waiter = asyncio.create_task(outcomes.wait_for(count))
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            task.result()
            return outcomes
        await consumer.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return outcomes
    finally:
        unsubscribe()
        if not waiter.done():
            waiter.cancel()
