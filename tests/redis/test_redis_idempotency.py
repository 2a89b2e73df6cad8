"""Idempotency on a real Redis: the Redis store, the completion folded into the XACK, and two
consumer processes SIGKILLed again and again without a lost or doubled completion."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.delivery import Delivery
from resilience.events import Outcome
from resilience.idempotency import ClaimLost, ClaimState, RedisStore, current_transaction
from resilience.pipeline import Pipeline
from resilience.testing import run_until_settled
from tests.redis.redis_support import MakeBackend, RedisServer, eventually

pytestmark = [pytest.mark.broker]

WORKER = Path(__file__).with_name("idempotent_worker.py")


def start(*args: str) -> subprocess.Popen[str]:
    """Start an idempotent worker process."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(process: subprocess.Popen[str]) -> None:
    """Block until the worker prints ``ready``."""
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != "ready":
        _, err = process.communicate(timeout=10)
        raise AssertionError(f"worker did not start ({line!r}): {err}")


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes started by the test; any still running are killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


async def test_redis_store_claims_completes_and_releases(
    client: aioredis.Redis, prefix: str
) -> None:
    """Redis store: one claim wins, a completed key reads as completed, release is owner-only."""
    store = RedisStore(client, prefix=prefix)
    delivery = Delivery({}, key="s", message_id="1-0")
    assert await store.claim("k", "a", 5) is ClaimState.CLAIMED
    assert await store.claim("k", "b", 5) is ClaimState.BUSY
    await store.release("k", "b")
    assert await client.get(f"{prefix}k") == b"a"
    async with store.complete("k", "a", 30, delivery) as effects:
        effects.call("SET", f"{prefix}effect", "1")
    assert await store.claim("k", "b", 5) is ClaimState.COMPLETED
    assert await client.get(f"{prefix}effect") == b"1"
    assert 29_000 < await client.pttl(f"{prefix}k") <= 30_000
    assert await store.claim("other", "a", 5) is ClaimState.CLAIMED
    await store.release("other", "a")
    assert await client.exists(f"{prefix}other") == 0


async def test_redis_store_does_not_complete_a_claim_taken_over(
    client: aioredis.Redis, prefix: str
) -> None:
    """A claim taken over by another owner is not completed, nor are the effects run."""
    store = RedisStore(client, prefix=prefix)
    await client.set(f"{prefix}k", "thief")
    with pytest.raises(ClaimLost):
        async with store.complete("k", "a", 30, Delivery({})) as effects:
            effects.call("SET", f"{prefix}effect", "1")
    assert await client.get(f"{prefix}k") == b"thief"
    assert await client.exists(f"{prefix}effect") == 0


async def test_completion_is_written_with_the_xack_and_duplicates_are_acked(
    client: aioredis.Redis, prefix: str, make_backend: MakeBackend
) -> None:
    """On the Redis backend the completion record and the XACK go together; a re-published
    message with the same key is acknowledged as a duplicate without running the handler."""
    backend: RedisBackend = make_backend()
    stream = f"{prefix}s"
    for _ in range(3):
        await backend.publish_message(stream, {"x": 1}, headers={"idempotency-key": "order-1"})
    runs: list[object] = []

    async def handler(payload: dict[str, Any]) -> None:
        transaction = current_transaction()
        runs.append(transaction)
        transaction.call("INCR", f"{prefix}effects")

    store = RedisStore(backend=backend, prefix=f"{prefix}idem:")
    pipeline = Pipeline().idempotent(store, header="idempotency-key")
    outcomes = await run_until_settled(ResilientConsumer(backend, policy=pipeline), handler, 3)
    await backend.flush()
    assert len(runs) == 1
    assert outcomes.counts[Outcome.SUCCESS] == 1
    assert outcomes.counts[Outcome.DUPLICATE] == 2
    assert await client.get(f"{prefix}effects") == b"1"
    assert await client.get(f"{prefix}idem:order-1") == b"done"
    assert await backend.pending(stream) == 0


async def test_completions_sent_with_claims_load_the_script_on_a_fresh_server(
    redis_server: RedisServer,
) -> None:
    """On a server that never saw the completion script, the completions travelling in the
    same pipeline as the next claim load it (NOSCRIPT) instead of being dropped: every entry is
    acknowledged once the backend has flushed."""
    backend = RedisBackend(redis_server.url, streams=["s"], group="g", consumer="c")
    try:
        for n in range(20):
            await backend.publish_message("s", {"n": n})
        store = RedisStore(backend=backend)
        consumer = ResilientConsumer(backend, policy=Pipeline().idempotent(store))
        outcomes = await run_until_settled(consumer, lambda payload: asyncio.sleep(0), 20)
        await backend.flush()
        assert outcomes.counts[Outcome.SUCCESS] == 20
        assert await backend.pending("s") == 0
    finally:
        await backend.aclose()


@pytest.mark.slow
async def test_sigkilled_consumers_lose_nothing_and_complete_nothing_twice(
    client: aioredis.Redis, prefix: str, redis_url: str, workers: list[subprocess.Popen[str]]
) -> None:
    """Two consumer processes, one SIGKILLed at random moments eight times and restarted: every
    message is completed exactly once (Redis store, completion recorded in the Lua script)."""
    stream = f"{prefix}jobs"
    total = 1000
    rng = random.Random(18)
    names = iter(f"w{i}" for i in range(100))

    def spawn() -> subprocess.Popen[str]:
        process = start(redis_url, stream, next(names), prefix, "--work", "0.01")
        workers.append(process)
        return process

    live = [spawn(), spawn()]
    for process in live:
        wait_ready(process)
    backend = RedisBackend(redis_url, streams=[stream], group="workers", consumer="publisher")
    await backend.publish_many(stream, [{"n": n} for n in range(total)])
    left_at_last_kill = total
    for _ in range(8):
        await asyncio.sleep(rng.uniform(0.1, 0.4))
        victim = live.pop(rng.randrange(len(live)))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        left_at_last_kill = total - await client.hlen(f"{prefix}done")
        live.append(spawn())

    async def drained() -> bool:
        return await client.hlen(f"{prefix}done") >= total and await backend.pending(stream) == 0

    await eventually(drained, timeout=120, what="the workers to complete every message")
    done = {int(k): int(v) for k, v in (await client.hgetall(f"{prefix}done")).items()}
    runs = {int(k): int(v) for k, v in (await client.hgetall(f"{prefix}runs")).items()}
    assert sorted(done) == list(range(total)), "no message lost"
    assert [n for n, count in done.items() if count != 1] == [], "no message completed twice"
    assert left_at_last_kill > 0, "every kill came while messages were still being processed"
    assert sum(runs.values()) >= total
    for process in live:
        process.send_signal(signal.SIGTERM)
    for process in live:
        _, err = process.communicate(timeout=15)
        assert process.returncode == 0, err
    await backend.aclose()


@pytest.mark.slow
async def test_sigkilled_consumers_write_no_duplicate_rows_with_postgres(
    client: aioredis.Redis,
    prefix: str,
    redis_url: str,
    postgres_table: tuple[str, str],
    workers: list[subprocess.Popen[str]],
) -> None:
    """Two consumer processes with the PostgreSQL store, one SIGKILLed at random moments eight
    times: the handler's own table ends with every message's row exactly once."""
    import psycopg

    dsn, table = postgres_table
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"CREATE TABLE {table} (n integer NOT NULL)")
    stream = f"{prefix}jobs"
    total = 800
    rng = random.Random(5)
    names = iter(f"p{i}" for i in range(100))

    def spawn() -> subprocess.Popen[str]:
        process = start(
            redis_url, stream, next(names), prefix, "--store", "postgres", "--dsn", dsn,
            "--table", table, "--work", "0.01",
        )  # fmt: skip
        workers.append(process)
        return process

    async def table_rows() -> list[int]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cursor = await conn.execute(f"SELECT n FROM {table}")
            return [row[0] for row in await cursor.fetchall()]

    live = [spawn(), spawn()]
    for process in live:
        wait_ready(process)
    backend = RedisBackend(redis_url, streams=[stream], group="workers", consumer="publisher")
    await backend.publish_many(stream, [{"n": n} for n in range(total)])
    for _ in range(8):
        await asyncio.sleep(rng.uniform(0.1, 0.4))
        victim = live.pop(rng.randrange(len(live)))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        live.append(spawn())
    left_at_last_kill = total - len(await table_rows())

    async def drained() -> bool:
        return len(await table_rows()) >= total and await backend.pending(stream) == 0

    await eventually(drained, timeout=120, what="the workers to complete every message")
    found = await table_rows()
    assert left_at_last_kill > 0, "every kill came while messages were still being processed"
    missing = sorted(set(range(total)) - set(found))
    doubled = sorted(n for n in set(found) if found.count(n) > 1)
    assert missing == [], "no message lost"
    assert doubled == [], "no duplicate row"
    for process in live:
        process.send_signal(signal.SIGTERM)
    for process in live:
        _, err = process.communicate(timeout=15)
        assert process.returncode == 0, err
    await backend.aclose()
