"""Quick throughput check: drain a pre-filled stream, at-least-once, three ways, same run.

Run it with ``.venv/bin/python tests/redis/bench_redis.py [--messages 100000]`` against the Redis
at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). It is not collected by pytest.

* ``hand-written``: a redis-py loop, XREADGROUP COUNT 500 + one multi-id XACK per batch.
* ``abe-redis pattern``: XREADGROUP COUNT 10 and one awaited XACK per message (what the published
  abe-redis provider does).
* ``ResilientConsumer``: :class:`~resilience.consumer.ResilientConsumer` over
  :class:`~abe.backends.message_queue.service.redis.RedisBackend` (batch 500), acks after the
  pipeline's outcome is final: with no middleware, with the default ``Policy()`` (retry and an
  attempt timeout), and with dead-letter routing and a circuit breaker added.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.policy import Policy
from tests.redis.redis_support import read_reply

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
FULL = Policy.from_dict({"dead_letter": {"destination": "backend"}, "circuit_breaker": {}})
"""The default policy plus dead-letter routing (to the backend) and a circuit breaker."""


async def prefill(client: aioredis.Redis, key: str, count: int) -> None:
    """Write ``count`` small entries in the wire format."""
    for start in range(0, count, 5000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(count, start + 5000)):
            pipe.xadd(key, {"data": json.dumps({"n": n, "kind": "order", "amount": 12.5})})
        await pipe.execute()


async def hand_written(client: aioredis.Redis, key: str, group: str, total: int) -> float:
    """XREADGROUP COUNT 500 + one multi-id XACK per batch."""
    await client.xgroup_create(key, group, id="0")
    seen = 0
    start = time.perf_counter()
    while seen < total:
        reply = await client.xreadgroup(group, "c", {key: ">"}, count=500, block=1000)
        for _stream, entries in read_reply(reply):
            ids = []
            for entry_id, fields in entries:
                json.loads(fields[b"data"])
                ids.append(entry_id)
            await client.xack(key, group, *ids)
            seen += len(ids)
    return time.perf_counter() - start


async def abe_redis(client: aioredis.Redis, key: str, group: str, total: int) -> float:
    """XREADGROUP COUNT 10 and one XACK per message."""
    await client.xgroup_create(key, group, id="0")
    seen = 0
    start = time.perf_counter()
    while seen < total:
        reply = await client.xreadgroup(group, "c", {key: ">"}, count=10, block=1000)
        for stream, entries in read_reply(reply):
            for entry_id, fields in entries:
                json.loads(fields.get(b"data", b"{}").decode("utf-8"))
                await client.xack(stream, group, entry_id)
                seen += 1
    return time.perf_counter() - start


async def resilient(key: str, group: str, total: int, policy: Any) -> float:
    """ResilientConsumer over RedisBackend until ``total`` messages were handled."""
    backend = RedisBackend(URL, streams=[key], group=group, consumer="c", batch_size=500)
    done = asyncio.Event()
    seen = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal seen
        seen += 1
        if seen == total:
            done.set()

    consumer = ResilientConsumer(backend, policy=policy, drain_timeout=5)
    start = time.perf_counter()
    task = asyncio.create_task(consumer.run(handler))
    await done.wait()
    await consumer.shutdown()
    elapsed = time.perf_counter() - start
    await task
    pending = await backend.pending(key)
    await backend.aclose()
    assert pending == 0, f"{pending} entries left unacknowledged"
    return elapsed


async def main() -> None:
    """Run every variant on one pre-filled stream and print msgs/s."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    total = args.messages
    client = aioredis.Redis.from_url(URL)
    key = f"bench:{uuid.uuid4().hex}"
    variants: list[tuple[str, Callable[[str], Awaitable[float]]]] = [
        ("hand-written (COUNT 500, 1 XACK/batch)", lambda g: hand_written(client, key, g, total)),
        ("abe-redis pattern (COUNT 10, XACK/msg)", lambda g: abe_redis(client, key, g, total)),
        ("ResilientConsumer, no middleware", lambda g: resilient(key, g, total, [])),
        ("ResilientConsumer, Policy() defaults", lambda g: resilient(key, g, total, Policy())),
        ("ResilientConsumer, + dead_letter, breaker", lambda g: resilient(key, g, total, FULL)),
    ]
    try:
        await prefill(client, key, total)
        rates: dict[str, list[float]] = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, run in variants:
                elapsed = await run(f"g-{uuid.uuid4().hex}")
                rates[name].append(total / elapsed)
        # Other processes share the CPU: compare within each round, report the median ratio.
        base = rates[variants[0][0]]
        slow = rates[variants[1][0]]
        print(f"{total} messages, {args.rounds} rounds, {URL}; median of per-round ratios")
        for name, values in rates.items():
            vs_base = statistics.median(v / b for v, b in zip(values, base, strict=True))
            vs_slow = statistics.median(v / s for v, s in zip(values, slow, strict=True))
            print(
                f"{name:42s} {statistics.median(values):10,.0f} msgs/s  "
                f"{vs_base:6.1%} of hand-written  {vs_slow:5.1f}x abe-redis pattern"
            )
    finally:
        await client.delete(key)
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
