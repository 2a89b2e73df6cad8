"""A fresh-interpreter scenario for the logging-silence tests (run as a script, not collected).

It makes the library log everything it logs in ordinary trouble: a handler failure (with its
traceback), a scheduled retry, a circuit breaker opening, a dead letter and a backend warning
(an unreachable Redis). With the argument ``configured`` it first calls
``logging.basicConfig(level=DEBUG)`` on stderr, as an application would. The script itself prints
nothing; it exits 0 when every step really happened and 3 otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

FORMAT = "%(levelname)s %(name)s %(message)s"


class OneMessageBackend:
    """A plain backend whose iterator yields one payload and ends."""

    async def publish(self, key: str, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}

    @classmethod
    def from_env(cls) -> OneMessageBackend:
        return cls()


async def handler_failure() -> bool:
    """AsyncLoopConsumer logs a failing handler's exception with its traceback."""
    from abe.backends.message_queue.consumer import AsyncLoopConsumer

    calls: list[dict[str, Any]] = []

    async def handler(payload: dict[str, Any]) -> None:
        calls.append(payload)
        raise ValueError("handler failed on purpose")

    consumer = AsyncLoopConsumer(OneMessageBackend())
    await consumer.run(handler)
    await consumer.shutdown()
    return calls == [{"n": 1}]


async def retry_breaker_dead_letter() -> bool:
    """A failing call is retried, trips the breaker and is dead-lettered (virtual time)."""
    from resilience.breaker import BreakerRegistry, CircuitBreaker
    from resilience.clock import FakeClock
    from resilience.dead_letter import DeadLetterRouter, MemoryStore
    from resilience.delivery import Delivery
    from resilience.pipeline import Pipeline
    from resilience.retry import Fixed, Retry

    clock = FakeClock()
    store = MemoryStore()
    breaker = CircuitBreaker(
        "scenario",
        mode="fail_fast",
        clock=clock,
        registry=BreakerRegistry(),
        failure_threshold=2,
    )
    pipeline = Pipeline(
        DeadLetterRouter(store, clock=clock),
        Retry(attempts=2, wait=Fixed(0.5), clock=clock),
        breaker,
    )

    async def handler(payload: dict[str, Any]) -> None:
        raise ConnectionError("dependency down")

    call = pipeline.build(handler)
    # Two distinct messages: the breaker counts each failing message once.
    for order in (7, 8):
        await call(Delivery({"order": order}, key="orders", message_id=str(order), started_at=0.0))
    records = await store.find()
    return (
        clock.sleeps == [0.5, 0.5] and len(records) == 2 and breaker.breaker.state.value == "open"
    )


async def backend_warning() -> bool:
    """The Redis backend warns that Redis is unavailable (nothing listens on the port)."""
    from abe.backends.message_queue.service.redis import RedisBackend

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backing_off = asyncio.Event()

    async def sleep(seconds: float) -> None:
        backing_off.set()
        await asyncio.Event().wait()

    backend = RedisBackend(
        f"redis://127.0.0.1:{port}/0", streams=["silence"], group="silence", sleep=sleep
    )

    async def pull() -> None:
        async for _ in backend.deliveries(group="silence"):
            pass

    task = asyncio.create_task(pull())
    try:
        async with asyncio.timeout(30):
            await backing_off.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await backend.close()
    return backend.stats.reconnects >= 1


async def main() -> bool:
    results = [
        await handler_failure(),
        await retry_breaker_dead_letter(),
        await backend_warning(),
    ]
    return all(results)


if __name__ == "__main__":
    if sys.argv[1:] == ["configured"]:
        logging.basicConfig(level=logging.DEBUG, format=FORMAT)
    sys.exit(0 if asyncio.run(main()) else 3)
