"""Draining pre-published messages through one consumer contender, timed in CPU time.

Shared by the success-path table (:mod:`.overhead`) and the failure-path table
(:mod:`.failures`).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from abe.backends.message_queue.service.memory import MemoryBackend

from ._contenders import KEY, Setup

__all__ = ["_drain", "_now"]

_now = time.process_time
"""The benchmark's clock: CPU time of this process. The contenders are CPU-bound (an in-memory
backend, a handler that does nothing), so CPU time is their cost, and time the process spends
waiting for a core on a busy machine is not counted against whichever contender it hits."""


async def _drain(setup: Setup, messages: int) -> float:
    """Seconds per message for one contender to consume ``messages`` pre-published ones."""
    backend = MemoryBackend.isolated(keys=[KEY])
    for n in range(messages):
        await backend.publish_message(KEY, {"n": n})
    consumer, wrap = setup(backend)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    count = 0
    first = last = 0.0

    async def inner(payload: dict[str, Any]) -> None:
        nonlocal count, first, last
        count += 1
        if count == 1:
            first = _now()
        elif count == messages:
            last = _now()
            done.set_result(None)

    gc.collect()
    gc.disable()
    task = asyncio.create_task(consumer.run(wrap(inner)))
    try:
        await asyncio.wait({done, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gc.enable()
        await consumer.shutdown()
        await asyncio.gather(task, return_exceptions=True)
    if not done.done():
        task.result()
        raise RuntimeError("the consumer stopped before consuming every message")
    return (last - first) / max(1, messages - 1)
