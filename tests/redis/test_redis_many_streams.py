"""RedisBackend with many streams: round trips that do not grow with streams, fairness, patterns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from abe.backends.message_queue.service._redis_reader import ACK_CHUNK, DECODE_CHUNK
from abe.backends.message_queue.service._redis_settings import RedisSettings, is_pattern
from tests.consume_stream import closable
from tests.redis.redis_support import MakeBackend, eventually

pytestmark = pytest.mark.broker


async def _take(stream: AsyncIterator[Any], count: int = 1, timeout: float = 5.0) -> list[Any]:
    async with asyncio.timeout(timeout):
        return [await anext(stream) for _ in range(count)]


class RoundTrips:
    """Counts round trips to Redis made by this process: single commands and pipelines."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commands: list[str] = []
        self.pipelines: list[list[str]] = []
        command = aioredis.Redis.execute_command
        execute = Pipeline.execute

        async def counted_command(client: Any, *args: Any, **options: Any) -> Any:
            self.commands.append(str(args[0]).upper())
            # redis-py leaves Redis.execute_command unannotated.
            return await command(client, *args, **options)  # type: ignore[no-untyped-call]

        async def counted_execute(pipe: Any, raise_on_error: bool = True) -> Any:
            self.pipelines.append([str(c[0][0]).upper() for c in pipe.command_stack])
            return await execute(pipe, raise_on_error)

        monkeypatch.setattr(aioredis.Redis, "execute_command", counted_command)
        monkeypatch.setattr(Pipeline, "execute", counted_execute)

    @property
    def total(self) -> int:
        return len(self.commands) + len(self.pipelines)


async def test_startup_with_many_streams_takes_a_few_round_trips(
    make_backend: MakeBackend, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating the groups of 60 streams, reclaiming on them, the delay scheduler's first check
    and the first read take a few round trips in all, and only the group creation sends one
    command per stream: with nothing idle, the reclaim is one script and no XAUTOCLAIM."""
    streams = [f"{prefix}s{i}" for i in range(60)]
    backend = make_backend(streams=streams)
    await backend.publish(streams[-1], {"n": 1})
    trips = RoundTrips(monkeypatch)
    stream = backend.deliveries()
    (message,) = await _take(stream)
    assert message.payload == {"n": 1}
    scheduler = backend.delay_scheduler
    assert scheduler is not None

    async def checked() -> bool:
        return not scheduler._unchecked

    await eventually(checked, what="the scheduler's first check")
    shown = (trips.commands, [p[:2] for p in trips.pipelines])
    loads = trips.commands.count("SCRIPT LOAD")  # a script the server did not know yet ...
    assert trips.total - 2 * loads <= 6, shown  # ... is loaded and its call sent again
    creates = [p for p in trips.pipelines if p and p[0] == "XGROUP CREATE"]
    assert [len(p) for p in creates] == [60], shown
    assert all(len(p) == 1 for p in trips.pipelines if p not in creates), shown
    assert not [p for p in trips.pipelines if "XAUTOCLAIM" in p], shown
    await closable(stream).aclose()


async def test_reclaim_among_many_streams_claims_only_where_entries_are_idle(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of 60 streams, the two holding entries a crashed consumer left idle get an XAUTOCLAIM
    (one pipeline of two), and their entries are delivered again with their delivery counts;
    a stream whose entry is pending but not idle long enough is left alone."""
    streams = [f"{prefix}s{i}" for i in range(60)]
    crashed = make_backend(streams=streams, consumer="crashed")
    for key in (streams[7], streams[42], streams[50]):
        await crashed.publish(key, {"key": key})
    await _take(crashed.deliveries(), 3)  # held by "crashed", never settled
    for key in (streams[7], streams[42]):  # idle for 10 s, as if "crashed" had died then
        rows = await client.xpending_range(key, "g", "-", "+", 10)
        ids: list[Any] = [row["message_id"] for row in rows]
        await client.xclaim(key, "g", "crashed", 0, ids, idle=10_000, justid=True)
    backend = make_backend(streams=streams, claim_idle=5)
    trips = RoundTrips(monkeypatch)
    stream = backend.deliveries()
    taken = await _take(stream, 2)
    assert {m.payload["key"] for m in taken} == {streams[7], streams[42]}
    assert {m.delivery_count for m in taken} == {2}
    claims = [p for p in trips.pipelines if p and p[0] == "XAUTOCLAIM"]
    assert [len(p) for p in claims] == [2], trips.pipelines
    assert backend.stats.reclaimed == 2
    (row,) = await client.xpending_range(streams[50], "g", "-", "+", 10)
    assert row["consumer"] == b"crashed"  # pending, not idle long enough: left alone
    for message in taken:
        await backend.ack(message)
    await closable(stream).aclose()


async def test_a_drain_across_many_streams_acks_per_stream_without_a_task_per_ack(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis
) -> None:
    """2,000 entries over 100 streams read in one XREADGROUP are acknowledged with one multi-id
    XACK per stream in one or two round trips, no task per ack, nothing left pending."""
    streams = [f"{prefix}s{i}" for i in range(100)]
    backend = make_backend(streams=streams, batch_size=500, ack_delay=60)
    pipe = client.pipeline(transaction=False)
    for n in range(2000):
        pipe.xadd(streams[n % 100], {"data": f'{{"n": {n}}}'})
    await pipe.execute()
    stream = backend.deliveries()
    first = await _take(stream)
    rest = []
    while (message := stream.next_nowait()) is not None:  # type: ignore[attr-defined]
        rest.append(message)
    messages = first + rest
    assert len(messages) == 2000
    tasks_before = len(asyncio.all_tasks())
    for message in messages:
        backend.ack_nowait(message)
    assert len(asyncio.all_tasks()) <= tasks_before + 1
    assert backend._settling == set()
    assert await backend.pending() == 2000  # nothing is sent before the next read or flush
    await backend.flush()
    assert await backend.pending() == 0
    assert backend.stats.acked == 2000
    assert backend.stats.ack_round_trips == 1
    await closable(stream).aclose()


async def test_a_very_large_read_sends_acks_in_the_background_while_it_is_handled(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis
) -> None:
    """10,000 entries over 100 streams arrive in one read; handled one by one without any
    await of their own, their first ACK_CHUNK acknowledgements (and the few more handed out
    with the same decoded chunk) reach Redis in one round trip of one multi-id XACK per stream
    before the read is done with, the rest with the flush."""
    streams = [f"{prefix}s{i}" for i in range(100)]
    backend = make_backend(streams=streams, batch_size=500, ack_delay=60)
    pipe = client.pipeline(transaction=False)
    for n in range(10_000):
        pipe.xadd(streams[n // 100], {"data": f'{{"n": {n}}}'})
    await pipe.execute()
    stream = backend.deliveries()
    numbers: list[int] = []
    while len(numbers) < 10_000:
        message = stream.next_nowait() or await anext(stream)  # type: ignore[attr-defined]
        numbers.append(message.payload["n"])
        backend.ack_nowait(message)
    assert numbers == list(range(10_000))  # one read, stream by stream, in order
    # One background flush of at most ACK_CHUNK (and the rest of the chunk being handed out
    # when the count was reached; less when the read came in two parts) reached Redis.
    assert 10_000 - ACK_CHUNK - DECODE_CHUNK <= await backend.pending() <= 10_000 // 2
    # Redis has them; the flush task may still be taking its reply (another connection
    # answered the count first): wait for it before counting round trips.
    flushing = message.handle._flushing
    if flushing is not None:
        await flushing
    assert backend.stats.ack_round_trips == 1
    await backend.flush()
    assert await backend.pending() == 0
    assert backend.stats.ack_round_trips == 2
    await closable(stream).aclose()


async def test_a_large_read_is_decoded_a_few_entries_at_a_time_and_given_back_on_close(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis
) -> None:
    """2,000 entries over 100 streams arrive in one read: all are held (kept alive) at once,
    but only a chunk at a time becomes a delivery; closing after a few deliveries hands every
    undecoded entry back, so another consumer gets all the others and nothing is lost."""
    streams = [f"{prefix}s{i}" for i in range(100)]
    backend = make_backend(streams=streams, batch_size=500, claim_idle=60)
    pipe = client.pipeline(transaction=False)
    for n in range(2000):
        pipe.xadd(streams[n % 100], {"data": f'{{"n": {n}}}'})
    await pipe.execute()
    stream = backend.deliveries()
    taken = await _take(stream, 3)
    (reader,) = backend._readers
    assert sum(len(held) for held in reader.unsettled.values()) == 2000
    assert 0 < len(reader.waiting) + len(taken) <= DECODE_CHUNK
    assert reader.undecoded
    for message in taken:
        await backend.ack(message)
    await closable(stream).aclose()
    assert await backend.pending() == 1997  # given back: marked idle, reclaimed by anyone
    other = make_backend(streams=streams, consumer="other", claim_idle=60)
    rest = other.deliveries()
    numbers = {m.payload["n"] for m in await _take(rest, 1997, timeout=30)}
    assert numbers == set(range(2000)) - {m.payload["n"] for m in taken}
    await closable(rest).aclose()


async def test_a_busy_stream_does_not_starve_the_others(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis
) -> None:
    """With 2,000 entries waiting in one stream and one in each of 20 others, every quiet
    stream's entry is delivered within the first read (batch_size from each stream)."""
    hot = f"{prefix}hot"
    quiet = [f"{prefix}q{i}" for i in range(20)]
    backend = make_backend(streams=[hot, *quiet], batch_size=10)
    pipe = client.pipeline(transaction=False)
    for n in range(2000):
        pipe.xadd(hot, {"data": f'{{"n": {n}}}'})
    for key in quiet:
        pipe.xadd(key, {"data": '{"quiet": true}'})
    await pipe.execute()
    stream = backend.deliveries()
    delivered = await _take(stream, 30)
    assert {m.key for m in delivered if m.key != hot} == set(quiet)
    for message in delivered:
        await backend.ack(message)
    await closable(stream).aclose()


async def test_a_stream_created_after_start_is_read_without_a_restart(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis
) -> None:
    """With streams=['<prefix>tenant:*'], streams that appear while the consumer runs are
    found by the periodic look-up and read from their first entry; others are not read."""
    backend = make_backend(streams=[f"{prefix}tenant:*"], discover_interval=0.05, block=0.05)
    await client.xadd(f"{prefix}tenant:a", {"data": '{"tenant": "a"}'})
    await client.xadd(f"{prefix}other", {"data": '{"tenant": "none"}'})
    stream = backend.deliveries()
    (first,) = await _take(stream)
    assert (first.key, first.payload) == (f"{prefix}tenant:a", {"tenant": "a"})
    await backend.ack(first)

    reader = asyncio.create_task(_take(stream, 2))
    await client.xadd(f"{prefix}tenant:b", {"data": '{"tenant": "b", "n": 1}'})
    await client.xadd(f"{prefix}tenant:b", {"data": '{"tenant": "b", "n": 2}'})
    later = await reader
    assert [(m.key, m.payload) for m in later] == [
        (f"{prefix}tenant:b", {"tenant": "b", "n": 1}),
        (f"{prefix}tenant:b", {"tenant": "b", "n": 2}),
    ]
    for message in later:
        await backend.ack(message)
    await backend.flush()
    assert await backend.pending() == 0
    assert await client.xlen(f"{prefix}other") == 1
    groups = await client.xinfo_groups(f"{prefix}other")
    assert groups == []
    await closable(stream).aclose()


async def test_a_pattern_matching_nothing_yet_waits_quietly(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis
) -> None:
    """A reader whose only pattern matches no stream waits (no error, no stream created) until
    one appears."""
    backend = make_backend(streams=[f"{prefix}t:*"], discover_interval=0.05, block=0.05)
    stream = backend.deliveries()
    reader = asyncio.create_task(_take(stream))
    await asyncio.sleep(0.2)
    assert not reader.done()
    assert [k async for k in client.scan_iter(match=f"{prefix}*")] == []
    await client.xadd(f"{prefix}t:1", {"data": '{"n": 1}'})
    (message,) = await reader
    assert message.payload == {"n": 1}
    await backend.ack(message)
    await closable(stream).aclose()


async def test_a_discovered_stream_that_is_deleted_is_dropped_not_recreated(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis
) -> None:
    """Deleting a stream found through a pattern stops its reading; it is not created again,
    and the other matching streams keep flowing."""
    backend = make_backend(streams=[f"{prefix}t:*"], discover_interval=0.05, block=0.05)
    await client.xadd(f"{prefix}t:gone", {"data": '{"n": 0}'})
    await client.xadd(f"{prefix}t:kept", {"data": '{"n": 1}'})
    stream = backend.deliveries()
    for message in await _take(stream, 2):
        await backend.ack(message)
    await backend.flush()
    await client.delete(f"{prefix}t:gone")
    await client.xadd(f"{prefix}t:kept", {"data": '{"n": 2}'})
    (message,) = await _take(stream)
    assert message.payload == {"n": 2}
    await backend.ack(message)

    async def gone_stays_gone() -> bool:
        return not await client.exists(f"{prefix}t:gone")

    await eventually(gone_stays_gone, what="the deleted stream to stay deleted")
    await asyncio.sleep(0.2)  # a few look-ups and reads later
    assert not await client.exists(f"{prefix}t:gone")
    await closable(stream).aclose()


async def test_pending_counts_the_streams_matching_a_pattern(
    make_backend: MakeBackend, prefix: str, client: aioredis.Redis
) -> None:
    """pending() with a pattern in streams counts the entries of every matching stream."""
    backend = make_backend(streams=[f"{prefix}t:*"], discover_interval=0.05)
    for key in ("a", "b"):
        await client.xadd(f"{prefix}t:{key}", {"data": '{"n": 1}'})
    stream = backend.deliveries()
    messages = await _take(stream, 2)
    assert await backend.pending() == 2
    for message in messages:
        await backend.ack(message)
    await backend.flush()
    assert await backend.pending() == 0
    await closable(stream).aclose()


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("tenant:*", True),
        ("tenant:?", True),
        ("tenant:[ab]", True),
        ("orders", False),
        ("tenant\\*", False),
        ("a.b-c", False),
    ],
)
async def test_which_stream_keys_are_patterns(key: str, pattern: bool) -> None:
    """An unescaped *, ? or [ makes a stream key a pattern; a backslash escapes it."""
    assert is_pattern(key) is pattern


async def test_discover_interval_is_validated_and_read_from_the_environment() -> None:
    """REDIS_DISCOVER_INTERVAL_MS sets discover_interval; a bad value names the variable."""
    settings = RedisSettings.from_environ({"REDIS_DISCOVER_INTERVAL_MS": "2500"})
    assert settings.discover_interval == 2.5
    with pytest.raises(ValueError, match="REDIS_DISCOVER_INTERVAL_MS='0' is not valid"):
        RedisSettings.from_environ({"REDIS_DISCOVER_INTERVAL_MS": "0"})
    with pytest.raises(ValueError, match="discover_interval must be a finite number"):
        RedisSettings(discover_interval=-1)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_reads_decode_the_reply_of_either_protocol(
    make_backend: MakeBackend, prefix: str, redis_url: str, protocol: int
) -> None:
    """The reader takes the read's reply as the server sends it, a RESP2 list or a RESP3 map of
    streams, with entries holding headers or poison among them, from a client the user passes
    in."""
    client = aioredis.Redis.from_url(redis_url, protocol=protocol, socket_timeout=None)
    try:
        streams = [f"{prefix}a", f"{prefix}b"]
        backend = make_backend(streams=streams, client=client)
        await backend.publish_message(streams[0], {"n": 1}, headers={"traceparent": "t"})
        await client.xadd(streams[1], {"data": b"not json"})
        await client.xadd(streams[1], {"data": b'{"n":2}'})
        stream = backend.deliveries()
        got = await _take(stream, 3)
        assert [(m.key, m.payload, dict(m.headers)) for m in got] == [
            (streams[0], {"n": 1}, {"traceparent": "t"}),
            (streams[1], {}, {}),
            (streams[1], {"n": 2}, {}),
        ]
        assert got[1].decode_error is not None
        assert got[1].raw == b"not json"
        for message in got:
            await backend.ack(message)
        await backend.flush()
        assert await backend.pending() == 0
        await closable(stream).aclose()
    finally:
        await client.aclose()
