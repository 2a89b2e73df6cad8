"""ResilientConsumer over RedisBackend: at-least-once under handler failure, real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from resilience.consumer import ResilientConsumer
from resilience.events import Outcome
from resilience.policy import Policy
from resilience.testing import run_until_settled, zero_waits
from tests.redis.redis_support import MakeBackend, stream_entries

pytestmark = pytest.mark.broker

POLICY = {
    "retry": {"attempts": 3, "initial": 0.01, "maximum": 0.05},
    "timeout": {"attempt": 5},
    "dead_letter": {"destination": "backend"},
}


async def _dead_letters(client: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"data"]) for _, f in stream_entries(await client.xrange(f"{stream}.dlq"))]


async def test_failures_are_retried_or_dead_lettered_and_every_entry_is_settled(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """Transient failures are retried to success, permanent ones are dead-lettered once, poison
    is dead-lettered without reaching the handler, and nothing is left pending."""
    stream = f"{prefix}s"
    backend = make_backend(batch_size=16)
    await backend.publish_many(stream, [{"n": n} for n in range(60)])
    await client.xadd(stream, {"data": b"{not json"})
    failed_once: set[int] = set()
    done: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        n = payload["n"]
        if n % 10 == 3:
            raise ValueError(f"order {n} is invalid")
        if n % 7 == 0 and n not in failed_once:
            failed_once.add(n)
            raise ConnectionError("flaky downstream")
        done.append(n)

    consumer = ResilientConsumer(backend, policy=Policy.from_dict(POLICY))
    with zero_waits():
        outcomes = await run_until_settled(consumer, handler, 61)
    permanent = {n for n in range(60) if n % 10 == 3}
    assert sorted(done) == sorted(set(range(60)) - permanent)
    dead = await _dead_letters(client, stream)
    assert sorted(d["payload"]["n"] for d in dead if d["payload"]) == sorted(permanent)
    assert len(dead) == len(permanent) + 1  # the poison entry too, each exactly once
    assert outcomes.counts[Outcome.DEAD_LETTERED] == len(permanent) + 1
    assert await backend.pending() == 0
    assert backend.stats.dead_lettered == len(permanent) + 1


async def test_concurrent_processing_settles_every_entry_exactly_once(
    make_backend: MakeBackend, prefix: str
) -> None:
    """With concurrency > 1 acks complete out of order and every entry is still acked once."""
    stream = f"{prefix}s"
    backend = make_backend(batch_size=25)
    await backend.publish_many(stream, [{"n": n} for n in range(300)])
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append(payload["n"])

    consumer = ResilientConsumer(backend, policy=Policy.from_dict(POLICY), concurrency=8)
    outcomes = await run_until_settled(consumer, handler, 300)
    assert sorted(seen) == list(range(300))
    assert outcomes.counts[Outcome.SUCCESS] == 300
    assert await backend.pending() == 0
    assert backend.stats.acked == 300


async def test_delivery_counts_from_redis_feed_the_attempt_limit(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """An entry Redis has already delivered too often (to consumers that crashed) is
    dead-lettered on its next failure without further retries."""
    stream = f"{prefix}s"
    backend = make_backend(claim_idle=0.05)
    await backend.publish(stream, {"n": 1})
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "crashed", {stream: ">"}, count=1)
    entry_id = stream_entries(await client.xrange(stream))[0][0]
    await client.xclaim(stream, "g", "crashed", 0, [entry_id], retrycount=2)
    await asyncio.sleep(0.06)  # idle on Redis's clock: reclaimable, delivered a 3rd time
    calls: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        calls.append(payload["n"])
        raise ConnectionError("still down")

    consumer = ResilientConsumer(backend, policy=Policy.from_dict(POLICY))
    with zero_waits():
        outcomes = await run_until_settled(consumer, handler, 1)
    assert calls == [1], "the 3rd delivery was the last attempt of 3"
    assert outcomes.counts[Outcome.DEAD_LETTERED] == 1
    (dead,) = await _dead_letters(client, stream)
    assert dead["attempts"]["delivery_count"] == 3
    assert backend.stats.reclaimed == 1
    assert await backend.pending() == 0


async def test_a_message_cancelled_at_shutdown_is_not_acked_and_comes_back(
    make_backend: MakeBackend, prefix: str
) -> None:
    """Shutting down mid-handler releases the message: the next consumer gets it again."""
    stream = f"{prefix}s"
    first = make_backend(claim_idle=60)
    await first.publish(stream, {"n": 1})
    started = asyncio.Event()

    async def stuck(payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    consumer = ResilientConsumer(first, policy=Policy.from_dict({"retry": False}), drain_timeout=0)
    task = asyncio.create_task(consumer.run(stuck))
    async with asyncio.timeout(5):
        await started.wait()
    await consumer.shutdown()
    await task  # run() returns normally after a graceful shutdown, even one that timed out
    assert consumer.drain_timed_out
    assert await first.pending() == 1
    assert first.stats.released == 1

    second = make_backend(claim_idle=60)
    got: list[dict[str, Any]] = []

    async def handler(payload: dict[str, Any]) -> None:
        got.append(payload)

    outcomes = await run_until_settled(ResilientConsumer(second), handler, 1)
    assert got == [{"n": 1}]
    assert outcomes.settled[0].outcome is Outcome.SUCCESS
    assert await second.pending() == 0


async def test_the_plain_async_loop_consumer_acks_after_its_handler_returns(
    make_backend: MakeBackend, prefix: str
) -> None:
    """AsyncLoopConsumer on consume(): each entry is acked once its handler has returned
    (raised or not), and the acks are flushed when the consumer shuts down."""
    from abe.backends.message_queue.consumer import AsyncLoopConsumer

    backend = make_backend(ack_delay=60)
    await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(5)])
    seen: list[int] = []
    all_seen = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["n"])
        if len(seen) == 5:
            all_seen.set()
        if payload["n"] == 2:
            raise RuntimeError("logged, not retried: the plain consumer has no policy")

    consumer = AsyncLoopConsumer(backend)
    task = asyncio.create_task(consumer.run(handler))
    async with asyncio.timeout(5):
        await all_seen.wait()
    await asyncio.sleep(0)  # let the loop come back for the next entry (acking the fifth)
    await consumer.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [0, 1, 2, 3, 4]
    assert await backend.pending() == 0
