"""Draining pre-published messages through one consumer contender, timed in CPU time.

Shared by the success-path table (:mod:`.overhead`) and the failure-path table
(:mod:`.failures`).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from abe.backends.message_queue.service.memory import MemoryBackend

from ._contenders import KEY, Setup

__all__ = ["_drain", "_now", "counting_handler", "gc_paused", "until_handled"]

_now = time.process_time
"""The benchmark's clock: CPU time of this process. The contenders are CPU-bound (an in-memory
backend, a handler that does nothing), so CPU time is their cost, and time the process spends
waiting for a core on a busy machine is not counted against whichever contender it hits."""


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block, and none left pending from before it.

    A timed section must not pay for a collection that the previous one's garbage triggers.
    Only the young generations are collected first: they hold everything allocated since the
    last collection (the previous timed section's objects among them, collection being off
    while it ran). A full collection would walk the whole heap each time; in a long-lived
    process (the test suite calls the benchmarks on a tiny size) that heap is large and one
    full collection costs more than the section it precedes. Collection is on again after the
    block only if it was on before.
    """
    enabled = gc.isenabled()
    gc.collect(1)
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def _drain(
    setup: Setup,
    messages: int,
    keys: int = 1,
    clock: Callable[[], float] = _now,
    *,
    named: bool = False,
) -> float:
    """Seconds per message for one contender to consume ``messages`` pre-published ones.

    Args:
        setup: The contender.
        messages: How many messages to publish first and then drain.
        keys: How many keys the messages are spread over (round robin); one key is
            :data:`~resilience.bench._contenders.KEY`.
        clock: What a second is: CPU time of the process by default.
        named: Read the keys by name (``MemoryBackend(keys=[...])``) rather than every key
            (one key is always read by name).
    """
    if keys == 1:
        names = [KEY]
        backend = MemoryBackend.isolated(keys=names)
    elif named:  # a reader of named keys: the lowest-ranked head among those keys
        names = [f"bench.key.{k}" for k in range(keys)]
        backend = MemoryBackend.isolated(keys=names)
    else:  # a reader of every key: the backend's order of all messages, whatever their keys
        names = [f"bench.key.{k}" for k in range(keys)]
        backend = MemoryBackend.isolated()
    for n in range(messages):
        await backend.publish_message(names[n % keys], {"n": n})
    consumer, wrap = setup(backend)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    count = 0
    first = last = 0.0

    async def inner(payload: dict[str, Any]) -> None:
        nonlocal count, first, last
        count += 1
        if count == 1:
            first = clock()
        elif count == messages:
            last = clock()
            done.set_result(None)

    task = asyncio.create_task(consumer.run(wrap(inner)))
    try:
        with gc_paused():
            await asyncio.wait({done, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await consumer.shutdown()
        await asyncio.gather(task, return_exceptions=True)
    if not done.done():
        task.result()
        raise RuntimeError("the consumer stopped before consuming every message")
    return (last - first) / max(1, messages - 1)


def counting_handler(
    messages: int,
) -> tuple[Callable[[Any], Awaitable[None]], asyncio.Future[None]]:
    """A handler that does nothing, and the future it resolves after ``messages`` calls."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    handled = 0

    async def handler(payload: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == messages:
            done.set_result(None)

    return handler, done


async def until_handled(
    task: asyncio.Task[None], done: asyncio.Future[None], flush: Callable[[], Awaitable[None]]
) -> None:
    """Wait until ``done`` (every message handled), then for the last acknowledgements.

    Raises:
        RuntimeError: the consumer's ``task`` ended first (or its own exception).
    """
    await asyncio.wait({done, task}, return_when=asyncio.FIRST_COMPLETED)
    if not done.done():
        task.result()
        raise RuntimeError("the consumer stopped before every message was handled")
    await asyncio.sleep(0)  # let the last delivery be acknowledged
    await flush()
