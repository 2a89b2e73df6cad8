"""Delayed redelivery on real Redis: the atomic hand-over, exactly-once re-adds with several
schedulers, tiered retry at volume, a SIGKILLed consumer and a Redis killed and restarted from
its append-only file while entries wait in the delay set.

Waits are scaled down from the production example (1 s) to 0.05 s so the suite stays short;
the mechanism does not depend on the length of the wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from abe.backends.message_queue.base.extensions import DelayingBackend
from abe.backends.message_queue.service._redis_delay import (
    DELAY_INDEX_KEY,
    DELAY_SETS_LUA,
    DUE_STREAMS_LUA,
    HAND_OVER_LUA,
    MOVE_DUE_LUA,
    DelayScheduler,
    delay_key,
    run_pipelined,
)
from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.events import MessageSettled, Outcome
from resilience.policy import Policy
from resilience.testing import capture_events
from tests.redis.redis_support import (
    MakeBackend,
    RedisServer,
    eventually,
    list_values,
    read_reply,
    stream_entries,
)

pytestmark = [pytest.mark.broker]

WORKER = Path(__file__).with_name("redis_delay_worker.py")
WAIT = 0.05
"""The retry wait, scaled down from 1 s."""


def start(url: str, stream: str, name: str, record: str, *args: str) -> subprocess.Popen[str]:
    """Start tests/redis/redis_delay_worker.py and wait for its ``ready`` line."""
    process = subprocess.Popen(
        [sys.executable, str(WORKER), url, stream, name, record, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "ready", process.stderr.read() if process.stderr else line
    return process


async def make_due(client: aioredis.Redis, stream: str, members: list[bytes]) -> None:
    """Make ``members`` of the delay set of ``stream`` due now, and say so in the delay index
    (as the scripts that change delay sets do)."""
    await client.zadd(delay_key(stream), dict.fromkeys(members, 0), xx=True)
    await client.zadd(DELAY_INDEX_KEY, {stream: 0})


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes started by the test; any still running are killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


async def test_release_later_acks_and_delays_in_one_step(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """After release_later the entry is neither pending nor in the stream's reach until due,
    then comes back with its headers, a new id and its delivery count raised."""
    backend = make_backend(block=0.1)
    assert isinstance(backend, DelayingBackend)  # the extension, checked at run time
    stream = f"{prefix}s"
    await backend.publish_message(stream, {"n": 1}, headers={"traceparent": "00-ab-cd-01"})
    deliveries = backend.deliveries()
    first = await anext(deliveries)
    await backend.release_later(first, 0.3)
    assert await backend.pending(stream) == 0
    assert await client.zcard(delay_key(stream)) == 1
    again = await anext(deliveries)
    assert again.payload == {"n": 1}
    assert again.delivery_count == 2
    assert again.headers["traceparent"] == "00-ab-cd-01"
    assert again.message_id != first.message_id
    assert await client.zcard(delay_key(stream)) == 0
    await backend.ack(again)
    await backend.flush()
    assert await backend.pending(stream) == 0


async def test_release_later_of_a_settled_entry_adds_nothing(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """An entry already acknowledged is not put in the delay set (no duplicate)."""
    backend = make_backend(block=0.1)
    stream = f"{prefix}s"
    await backend.publish(stream, {"n": 1})
    message = await anext(backend.deliveries())
    await client.xack(stream, "g", message.message_id or "")
    await backend.release_later(message, 0)
    assert await client.zcard(delay_key(stream)) == 0


async def test_hand_overs_of_one_loop_turn_share_a_round_trip_with_their_own_replies(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """Slots failing together hand over in one pipelined round trip, each still its own atomic
    script: the pending entries move to the delay set, the one acknowledged meanwhile does not."""
    backend = make_backend(block=0.1)
    stream = f"{prefix}s"
    await backend.publish_many(stream, [{"n": n} for n in range(4)])
    deliveries = backend.deliveries()
    messages = [await anext(deliveries) for _ in range(4)]
    await client.xack(stream, "g", messages[2].message_id or "")
    await asyncio.gather(*(backend.release_later(m, 3600) for m in messages))
    members = list_values(await client.zrange(delay_key(stream), 0, -1))
    delayed_ids = sorted(json.loads(member)["id"] for member in members)
    assert delayed_ids == sorted(m.message_id or "" for m in messages if m is not messages[2])
    assert await backend.pending(stream) == 0


async def test_pipelined_scripts_load_a_script_redis_does_not_know(
    client: aioredis.Redis, prefix: str
) -> None:
    """A script Redis does not know (restarted, flushed) is loaded and only the calls it
    refused are sent again: none runs twice."""
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    real_sha = script.sha
    script.sha = "0" * 40  # what a restarted Redis's empty script cache looks like to a call
    replies = await run_pipelined(client, script, [((f"{prefix}a",), ()), ((f"{prefix}b",), ())])
    assert replies == [1, 1]
    assert script.sha == real_sha
    assert await client.get(f"{prefix}a") == b"1"


async def test_a_new_consumer_of_a_stream_pattern_finds_waiting_entries(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """Entries delayed from a stream found through a pattern come back to a consumer started
    later on the same pattern (it looks up the delay sets with SCAN)."""
    stream = f"{prefix}t:1"
    first = make_backend(streams=[f"{prefix}t:*"], block=0.1)
    await first.publish(stream, {"n": 1})
    message = await anext(first.deliveries())
    await first.release_later(message, 3600)
    assert await first.delayed() == 1
    await first.aclose()
    members = list_values(await client.zrange(delay_key(stream), 0, -1))
    await make_due(client, stream, members)  # due now
    second = make_backend(streams=[f"{prefix}t:*"], block=0.1, consumer="later")
    again = await asyncio.wait_for(anext(second.deliveries()), 10)
    assert again.payload == {"n": 1}
    assert again.key == stream
    assert again.delivery_count == 2


@pytest.mark.parametrize("delay", [-0.5, float("nan"), float("inf")])
async def test_release_later_refuses_bad_delays(make_backend: MakeBackend, delay: float) -> None:
    """A negative or non-finite delay is a ValueError; the entry stays pending."""
    backend = make_backend(block=0.1)
    await backend.publish(f"{backend.settings.streams[0]}", {"n": 1})
    message = await anext(backend.deliveries())
    with pytest.raises(ValueError, match="delay"):
        await backend.release_later(message, delay)
    assert await backend.pending() == 1


async def test_two_schedulers_re_add_each_due_entry_exactly_once(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str, redis_url: str
) -> None:
    """Two consumers' schedulers racing over one delay set re-add every entry exactly once."""
    stream = f"{prefix}s"
    backend = make_backend(block=0.1, batch_size=500)
    await backend.publish_many(stream, [{"n": n} for n in range(400)])
    deliveries = backend.deliveries()
    messages = [await anext(deliveries) for _ in range(400)]
    for message in messages:
        await backend.release_later(message, 3600)
    assert backend.delay_scheduler is not None
    await backend.delay_scheduler.stop()  # only the two racing schedulers below move entries
    members = list_values(await client.zrange(delay_key(stream), 0, -1))
    assert len(members) == 400
    await make_due(client, stream, members)  # all due now
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    schedulers = [DelayScheduler(c, [stream], batch=7) for c in clients]
    group = backend.settings.group
    unread_seen: list[int] = []

    async def turns(scheduler: DelayScheduler) -> None:
        for _ in range(3):  # one after the other, as a scheduler's task runs them
            await scheduler.move_due()

    try:
        for _ in range(400):
            await asyncio.gather(*(turns(s) for s in schedulers))
            # A consumer drains what came back: the paced re-adds make room again.
            read = read_reply(await client.xreadgroup(group, "drain", {stream: ">"}, count=1000))
            unread_seen.append(sum(len(entries) for _, entries in read))
            if not await client.zcard(delay_key(stream)):
                break
    finally:
        for c in clients:
            await c.aclose()
    assert sum(s.moved for s in schedulers) == 400
    # Never more unread than the backlog, plus the one entry each scheduler lets through
    # when there is no room.
    assert max(unread_seen) <= schedulers[0].backlog + len(schedulers)
    assert all(s.moved > 0 for s in schedulers)
    assert await client.zcard(delay_key(stream)) == 0
    entries = stream_entries(await client.xrange(stream))
    again = [e for e in entries if b"h:x-abe-deliveries" in e[1]]
    numbers = sorted(int(fields[b"data"].split(b":")[1].rstrip(b"}")) for _, fields in again)
    assert numbers == list(range(400))


async def test_a_message_published_meanwhile_does_not_queue_behind_returning_retries(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """200 retries come due at once, then a message is published: it is delivered among the
    first few (the retries come back paced by the stream's backlog), not after all 200, and
    every retry still comes back exactly once."""
    stream = f"{prefix}s"
    backend = make_backend(block=0.1, batch_size=50)
    await backend.publish_many(stream, [{"n": n} for n in range(200)])
    deliveries = backend.deliveries()
    for _ in range(200):
        await backend.release_later(await anext(deliveries), 3600)
    scheduler = backend.delay_scheduler
    assert scheduler is not None
    await scheduler.stop()
    members = list_values(await client.zrange(delay_key(stream), 0, -1))
    await make_due(client, stream, members)  # all due now
    await scheduler.move_due()  # a scheduler's turn with 200 entries due
    await backend.publish(stream, {"healthy": 1})
    scheduler.start()
    order: list[dict[str, Any]] = []
    while len(order) < 201:
        message = await anext(deliveries)
        order.append(dict(message.payload))
        await backend.ack(message)
    assert order.index({"healthy": 1}) <= 4  # the default backlog; was 200
    assert sorted(p["n"] for p in order if "n" in p) == list(range(200))
    assert await client.zcard(delay_key(stream)) == 0


async def test_retries_still_come_back_when_the_group_stays_behind(
    client: aioredis.Redis, prefix: str
) -> None:
    """With the group 4 or more unread entries behind, due entries are held back, but one per
    stream still comes back every ``poll`` seconds: retries are never starved."""
    stream = f"{prefix}s"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    for n in range(10):  # fresh traffic nobody has read yet
        await client.xadd(stream, {"data": f'{{"n":{n}}}'})
    members = {f'{{"id":"0-{n}","f":["data","{{\\"r\\":{n}}}"]}}': 0 for n in range(3)}
    await client.zadd(delay_key(stream), members)
    scheduler = DelayScheduler(client, [stream], poll=3600)
    await scheduler.move_due()
    assert (scheduler.moved, scheduler.held) == (1, {stream})
    await scheduler.move_due()  # within the same poll interval: nothing more
    assert scheduler.moved == 1
    eager = DelayScheduler(client, [stream], poll=0)  # every check is a new interval
    for _ in range(2):
        await eager.move_due()
    assert eager.moved == 2
    assert await client.zcard(delay_key(stream)) == 0
    assert await client.xlen(stream) == 13


async def test_thousand_messages_failing_five_times_wait_in_redis_not_in_the_consumer(
    make_backend: MakeBackend, prefix: str
) -> None:
    """1,000 messages failing 5 times (in_process = 1, 0.05 s waits, concurrency 4) all finish
    once, every retry is handed to Redis (no wait holds a slot), and healthy messages are handled
    while more failing messages wait in the delay set than the consumer could ever hold."""
    stream = f"{prefix}s"
    backend = make_backend(block=0.1, batch_size=50)
    publisher = make_backend()
    attempts: dict[int, int] = {}
    done: list[int] = []
    healthy_latency: list[float] = []
    in_flight_seen: list[int] = []
    delayed_while_healthy: list[int] = []
    handled = [0]  # failing attempts made so far
    retries_ahead: list[int] = []  # per healthy message published while retries come back

    async def handler(payload: dict[str, Any]) -> None:
        in_flight_seen.append(consumer.in_flight)
        if "healthy" in payload:
            healthy_latency.append(time.time() - payload["t"])
            delayed_while_healthy.append(len(attempts) - len(done))
            if payload["seen"] >= 0:
                retries_ahead.append(handled[0] - payload["seen"])
            return
        handled[0] += 1
        n = payload["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if attempts[n] <= 5:
            raise ConnectionError("dependency blip")
        done.append(n)

    policy = Policy.from_dict(
        {
            "retry": {
                "attempts": 8,
                "in_process": 1,
                "backoff": "fixed",
                "initial": WAIT,
                "maximum": WAIT,
            }
        }
    )
    consumer = ResilientConsumer(backend, policy=policy, concurrency=4)
    await publisher.publish_many(stream, [{"n": n} for n in range(1000)])
    with capture_events(consumer.events, MessageSettled) as settled:
        task = asyncio.create_task(consumer.run(handler))

        async def healthy_traffic() -> None:
            for i in range(40):
                # Once every failing message made its first attempt, the attempts handled
                # after this one was published are retries coming back ahead of it.
                seen = handled[0] if len(attempts) == 1000 else -1
                await publisher.publish(stream, {"healthy": i, "t": time.time(), "seen": seen})
                await asyncio.sleep(0.05)

        traffic = asyncio.create_task(healthy_traffic())

        async def finished() -> bool:
            return len(done) == 1000 and traffic.done() and len(healthy_latency) == 40

        try:
            await eventually(finished, timeout=120, what="1,000 messages and 40 healthy ones")
        finally:
            await consumer.shutdown()
            await task
    assert sorted(done) == list(range(1000))  # none lost, none twice
    assert set(attempts.values()) == {6}
    deferred = [e for e in settled if e.outcome is Outcome.DEFERRED]
    assert len(deferred) == 5000
    assert max(in_flight_seen) <= 4
    assert await backend.pending(stream) == 0
    assert await backend.delayed(stream) == 0
    # Healthy messages ran while failing ones waited in Redis, not in front of them.
    assert max(delayed_while_healthy) > 4
    # ... and did not queue behind the retries coming back: those are re-added paced by the
    # stream's backlog (unpaced, hundreds came back ahead of each).
    assert retries_ahead
    assert max(retries_ahead) <= 40, retries_ahead
    # Latency figures are measured by benchmarks/tiered_redis.py, never asserted here.


async def test_idle_checks_cost_the_same_commands_for_1_and_1000_streams(
    redis_server: RedisServer,
) -> None:
    """Idle checks of a scheduler serving 1,000 streams send as many commands to Redis as those
    of one serving 1 stream (the delay index says no stream has entries due); a delay set
    written without an index entry is still found by the first check, and an entry handed over
    afterwards to the last of the 1,000 streams comes back through the index."""
    client = aioredis.Redis.from_url(redis_server.url)

    async def idle_calls(scheduler: DelayScheduler) -> int:
        await scheduler.move_due()  # the first check visits every stream once
        await client.config_resetstat()
        for _ in range(20):
            assert await scheduler.move_due() > 3000  # the old entry below waits an hour
        stats = await client.info("commandstats")
        skip = ("cmdstat_config", "cmdstat_info")
        return sum(int(v["calls"]) for k, v in stats.items() if k not in skip)

    try:
        streams = [f"idle:{n}" for n in range(1000)]
        old = '{"id":"0-1","f":["data","{}"]}'
        await client.zadd(delay_key(streams[500]), {old: int(time.time() * 1000) + 3_600_000})
        scheduler = DelayScheduler(client, streams)
        few = await idle_calls(DelayScheduler(client, streams[:1]))
        many = await idle_calls(scheduler)
        assert few == many
        assert many <= 20 * 8  # a handful of commands per check, not one per stream
        assert await client.zscore(DELAY_INDEX_KEY, streams[500]) is not None  # found once
        # An entry handed over to stream 999 is found by the next check, through the index.
        last = streams[999]
        await client.xgroup_create(last, "g", id="0", mkstream=True)
        await client.xadd(last, {"data": '{"n":1}'})
        read = read_reply(await client.xreadgroup("g", "c", {last: ">"}, count=1))
        entry_id = read[0][1][0][0].decode()
        member = json.dumps({"id": entry_id, "f": ["data", '{"n":1}']})
        keys, args = (last, delay_key(last), DELAY_INDEX_KEY), ("g", entry_id, 0, member)
        script = client.register_script(HAND_OVER_LUA)
        assert await run_pipelined(client, script, [(keys, args)]) == [1]
        await client.config_resetstat()
        await scheduler.move_due()
        assert scheduler.moved == 1
        assert await client.zcard(delay_key(last)) == 0
        assert await client.xlen(last) == 2
        assert await client.zscore(DELAY_INDEX_KEY, last) is None  # its delay set is empty
        stats = await client.info("commandstats")
        assert int(stats["cmdstat_evalsha"]["calls"]) == 2  # the index, then stream 999 only
    finally:
        await client.aclose()


async def test_the_first_check_of_2500_streams_takes_a_few_commands(
    redis_server: RedisServer,
) -> None:
    """The first check of a scheduler serving 2,500 streams (each stream's delay set is looked
    at once, for sets written without an index entry) sends a few commands, not one per
    stream: one script per 1,000 streams says which delay sets exist, and only the one that
    does is visited; its due entry comes back and the stream enters the index. A stale index
    entry of a stream whose delay set is gone is dropped."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        streams = [f"first:{n}" for n in range(2500)]
        legacy = streams[1700]
        await client.xgroup_create(legacy, "g", id="0", mkstream=True)
        member = json.dumps({"id": "0-1", "f": ["data", '{"n":1}']})
        await client.zadd(delay_key(legacy), {member: int(time.time() * 1000) - 1000})
        await client.zadd(DELAY_INDEX_KEY, {streams[3]: int(time.time() * 1000) + 3_600_000})
        for script in (DUE_STREAMS_LUA, DELAY_SETS_LUA, MOVE_DUE_LUA):
            await client.script_load(script)
        await client.config_resetstat()
        scheduler = DelayScheduler(client, streams, backlog=0)
        await scheduler.move_due()
        stats = await client.info("commandstats")
        # One check of the index, one script per 1,000 streams, the one existing set.
        assert int(stats["cmdstat_evalsha"]["calls"]) == 1 + 3 + 1
        assert scheduler.moved == 1
        assert await client.xlen(legacy) == 1
        assert await client.zcard(delay_key(legacy)) == 0
        assert await client.zrange(DELAY_INDEX_KEY, 0, -1) == []  # stale entry dropped too
        assert not scheduler._unchecked
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_sigkill_while_entries_wait_then_restart_loses_nothing(
    redis_url: str, prefix: str, client: aioredis.Redis, workers: list[subprocess.Popen[str]]
) -> None:
    """A consumer SIGKILLed while entries wait in the delay set; its successor finishes all."""
    stream, record = f"{prefix}s", f"{prefix}record"
    publisher = RedisBackend(redis_url, streams=[stream], group="workers")
    try:
        await publisher.publish_many(stream, [{"n": n} for n in range(100)])
        first = start(redis_url, stream, "first", record, "--fail", "2", "--wait", "1.5")
        workers.append(first)

        async def all_waiting() -> bool:
            return int(await client.zcard(delay_key(stream))) == 100

        await eventually(all_waiting, timeout=30, what="all 100 entries in the delay set")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert await client.llen(record) == 0
        second = start(redis_url, stream, "second", record, "--fail", "2", "--wait", "0.05")
        workers.append(second)

        async def finished() -> bool:
            return int(await client.llen(record)) >= 100

        await eventually(finished, timeout=60, what="all 100 messages after the restart")
        done = [int(x) for x in await client.lrange(record, 0, -1)]
        assert sorted(set(done)) == list(range(100))
        assert len(done) == 100  # nothing was in process when the kill came: no duplicates
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
        assert await publisher.pending(stream) == 0
        assert await client.zcard(delay_key(stream)) == 0
    finally:
        await publisher.aclose()


@pytest.mark.slow
async def test_redis_kill_and_append_only_restart_keeps_the_delay_set(
    redis_server: RedisServer, workers: list[subprocess.Popen[str]]
) -> None:
    """Redis SIGKILLed while entries wait in the delay set and restarted from its append-only
    file: the entries come back due and every message finishes."""
    url, stream, record = redis_server.url, "delay:orders", "delay:record"
    client = aioredis.Redis.from_url(url)
    publisher = RedisBackend(url, streams=[stream], group="workers")
    try:
        await publisher.publish_many(stream, [{"n": n} for n in range(100)])
        first = start(url, stream, "first", record, "--fail", "1", "--wait", "1.0")
        workers.append(first)

        async def all_waiting() -> bool:
            return int(await client.zcard(delay_key(stream))) == 100

        await eventually(all_waiting, timeout=30, what="all 100 entries in the delay set")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        redis_server.kill()
        redis_server.start()
        await client.aclose()
        client = aioredis.Redis.from_url(url)
        assert await client.zcard(delay_key(stream)) == 100
        second = start(url, stream, "second", record, "--fail", "1", "--wait", "0.05")
        workers.append(second)

        async def finished() -> bool:
            return int(await client.llen(record)) >= 100

        await eventually(finished, timeout=60, what="all 100 messages after the Redis restart")
        done = [int(x) for x in await client.lrange(record, 0, -1)]
        assert sorted(done) == list(range(100))
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
    finally:
        await publisher.aclose()
        await client.aclose()
