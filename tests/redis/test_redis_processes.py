"""Real processes against a real Redis: a SIGKILLed consumer, two consumers in one group, and a
Redis restarted under a running consumer."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from abe.backends.message_queue.service._redis_settings import RedisSettings
from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.policy import Policy
from tests.redis.redis_support import (
    RedisServer,
    eventually,
    list_values,
    start_worker,
    stream_entries,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes started by the test; any still running are killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def _wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != "ready":
        _, err = process.communicate(timeout=10)
        raise AssertionError(f"worker did not start ({line!r}): {err}")


async def _records(client: aioredis.Redis, key: str) -> list[str]:
    return [r.decode() for r in list_values(await client.lrange(key, 0, -1))]


async def _dead_lettered(client: aioredis.Redis, stream: str) -> list[int]:
    import json

    entries = stream_entries(await client.xrange(f"{stream}.dlq"))
    return [json.loads(fields[b"data"])["payload"]["n"] for _, fields in entries]


async def test_sigkilled_consumer_mid_batch_is_recovered_by_a_live_one(
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    workers: list[subprocess.Popen[str]],
) -> None:
    """After a SIGKILL mid-batch a live consumer reclaims the dead one's entries: every message
    ends processed or dead-lettered (once), duplicates stay within one batch."""
    stream, record = f"{prefix}orders", f"{prefix}record"
    total, batch = 300, 50
    poison = {n for n in range(total) if n % 25 == 7}
    backend = RedisBackend(redis_url, streams=[stream], group="workers", consumer="live")
    await backend.publish_many(
        stream, [{"n": n, "poison": True} if n in poison else {"n": n} for n in range(total)]
    )
    doomed = start_worker(
        redis_url,
        stream,
        "doomed",
        record,
        "--batch-size",
        str(batch),
        "--claim-idle",
        "0.6",
        "--stall-after",
        "120",
    )
    workers.append(doomed)
    _wait_ready(doomed)

    async def stalled() -> bool:
        return await client.llen(record) >= 120

    await eventually(stalled, what="the doomed worker to process 120 messages")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    held = await client.xpending_range(stream, "workers", "-", "+", 1000, consumername="doomed")
    assert held, "the killed consumer held no pending entries: nothing was in flight"
    assert len(held) <= 2 * batch

    live = RedisBackend(
        redis_url, streams=[stream], group="workers", consumer="live", claim_idle=0.3
    )
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        if payload.get("poison"):
            from resilience.errors import DeadLetter

            raise DeadLetter("poison payload")
        seen.append(payload["n"])
        await client.rpush(record, f"live:{payload['n']}")

    policy = Policy.from_dict({"retry": False, "dead_letter": {"destination": "backend"}})
    consumer = ResilientConsumer(live, policy=policy)
    task = asyncio.create_task(consumer.run(handler))

    async def finished() -> bool:
        done = {int(r.split(":")[1]) for r in await _records(client, record)}
        dead = set(await _dead_lettered(client, stream))
        return done | dead == set(range(total)) and await live.pending(stream, group="workers") == 0

    try:
        await eventually(finished, timeout=20, what="every message processed or dead-lettered")
    finally:
        await consumer.shutdown()
        await task
    records = await _records(client, record)
    processed = [int(r.split(":")[1]) for r in records]
    dead = await _dead_lettered(client, stream)
    assert sorted(dead) == sorted(poison), "each poison message is dead-lettered exactly once"
    assert set(processed) == set(range(total)) - poison
    duplicates = len(processed) - len(set(processed))
    assert duplicates <= batch, f"{duplicates} duplicates exceed one batch in flight"
    assert live.stats.reclaimed == len(held), "every entry the dead consumer held was reclaimed"
    assert live.stats.dead_lettered >= 1
    await live.aclose()
    await backend.aclose()


async def test_two_consumer_processes_share_one_group_without_double_processing(
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    workers: list[subprocess.Popen[str]],
) -> None:
    """Two processes in one group split the entries between them and none is processed twice."""
    stream, record = f"{prefix}jobs", f"{prefix}record"
    total = 400
    for name in ("alpha", "beta"):
        worker = start_worker(
            redis_url, stream, name, record, "--batch-size", "10", "--work", "0.002"
        )
        workers.append(worker)
    for worker in workers:
        _wait_ready(worker)
    backend = RedisBackend(redis_url, streams=[stream], group="workers", consumer="publisher")
    await backend.publish_many(stream, [{"n": n} for n in range(total)])

    async def finished() -> bool:
        return await client.llen(record) >= total and await backend.pending(stream) == 0

    await eventually(finished, timeout=30, what="both workers to drain the stream")
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        out, err = worker.communicate(timeout=15)
        assert worker.returncode == 0, err
        assert "stopped" in out
    records = await _records(client, record)
    by_worker = {
        name: [r for r in records if r.startswith(f"{name}:")] for name in ("alpha", "beta")
    }
    numbers = [int(r.split(":")[1]) for r in records]
    assert sorted(numbers) == list(range(total)), "no entry lost, none processed twice"
    assert by_worker["alpha"], "both processes got a share of the work"
    assert by_worker["beta"], "both processes got a share of the work"
    await backend.aclose()


async def test_consumer_resumes_by_itself_after_redis_restarts_and_loses_nothing(
    redis_server: RedisServer,
) -> None:
    """A Redis killed and restarted (append-only) mid-stream: the consumer reconnects with
    backoff, resumes on its own, and every entry is processed."""
    stream = "restart:orders"
    settings = RedisSettings(
        url=redis_server.url,
        streams=(stream,),
        group="g",
        consumer="survivor",
        batch_size=20,
        claim_idle=1.0,
        block=0.2,
        reconnect_initial=0.05,
        reconnect_max=0.2,
        command_timeout=2.0,
    )
    backend = RedisBackend(settings=settings)
    publisher = RedisBackend(settings=settings)
    await publisher.publish_many(stream, [{"n": n} for n in range(200)])
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["n"])

    consumer = ResilientConsumer(backend, policy=Policy.from_dict({"retry": False}))
    task = asyncio.create_task(consumer.run(handler))

    async def some() -> bool:
        return len(seen) >= 50

    await eventually(some, what="the first 50 messages")
    redis_server.kill()

    async def outage_noticed() -> bool:
        return backend.stats.reconnects >= 2

    await eventually(outage_noticed, what="the consumer to hit the dead server and back off")
    redis_server.start()
    await publisher.publish_many(stream, [{"n": n} for n in range(200, 300)])

    async def everything() -> bool:
        return set(seen) == set(range(300))

    try:
        await eventually(everything, timeout=20, what="all 300 messages after the restart")

        async def settled() -> bool:
            return await publisher.pending(stream) == 0

        await eventually(settled, timeout=10, what="no pending entries")
    finally:
        await consumer.shutdown()
        await task
    assert len(seen) - len(set(seen)) <= settings.batch_size + 1
    await backend.aclose()
    await publisher.aclose()
