"""Redis round trips and throughput of the idempotency layer, against the same consumer without it.

Drains a Redis stream with a ``ResilientConsumer`` (concurrency 1, trivial handler) twice per
round, interleaved: without a layer (baseline) and with ``Idempotency(RedisStore(backend=...))``.
Round trips are counted on the client (every write of a command, or of a pipeline, to a
connection is one), so they do not depend on the machine's load; messages per second do, so
they are medians of interleaved rounds, reported as a ratio within this run::

    python benchmarks/idempotency_redis.py [--url redis://127.0.0.1:6379/0] [--messages 3000]
                                           [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.idempotency import RedisStore
from resilience.pipeline import Pipeline
from resilience.testing import run_until_settled


@contextmanager
def counting_round_trips() -> Iterator[Callable[[], int]]:
    """Count writes to Redis connections (one per command or pipeline) while inside."""
    count = 0
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        nonlocal count
        count += 1
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield lambda: count
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


async def drain(url: str, messages: int, idempotent: bool) -> tuple[float, float]:
    """Publish ``messages`` then drain them; returns (round trips per message, messages/s)."""
    stream = f"bench-idem:{uuid.uuid4().hex[:10]}"
    publisher = RedisBackend(url, streams=[stream], group="g", consumer="pub")
    await publisher.publish_many(stream, [{"n": n} for n in range(messages)])
    await publisher.aclose()
    backend = RedisBackend(url, streams=[stream], group="g", consumer="c")
    pipeline = Pipeline()
    if idempotent:
        pipeline.idempotent(RedisStore(backend=backend, prefix=f"{stream}:idem:"))

    async def handler(payload: dict[str, Any]) -> None:
        return None

    consumer = ResilientConsumer(backend, policy=pipeline)
    with counting_round_trips() as round_trips:
        started = time.perf_counter()
        await run_until_settled(consumer, handler, messages)
        await backend.flush()
        elapsed = time.perf_counter() - started
        trips = round_trips()
    pending = await backend.pending(stream)
    await backend.aclose()
    client = aioredis.Redis.from_url(url)
    keys = [k async for k in client.scan_iter(match=f"{stream}*", count=1000)]
    await client.delete(*keys)
    await client.aclose()
    if pending:
        raise AssertionError(f"{pending} messages left pending")
    return trips / messages, messages / elapsed


async def main() -> None:
    """Run the interleaved rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for idempotent in (False, True):
            results[idempotent].append(await drain(args.url, args.messages, idempotent))
    rows = {}
    for idempotent, runs in results.items():
        trips = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        rows[idempotent] = (trips, rate)
    base_trips, base_rate = rows[False]
    trips, rate = rows[True]
    print(f"{args.messages} messages x {args.rounds} interleaved rounds, medians, one run")
    print(f"{'consumer':<28}{'round trips/msg':>16}{'msgs/s':>10}")
    print(f"{'without the layer':<28}{base_trips:>16.3f}{base_rate:>10.0f}")
    print(f"{'with Idempotency(Redis)':<28}{trips:>16.3f}{rate:>10.0f}")
    print(f"extra round trips per message: {trips - base_trips:.3f} (goal: <= 1)")
    print(f"throughput ratio (with / without): {rate / base_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
