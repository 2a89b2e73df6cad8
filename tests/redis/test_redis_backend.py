"""RedisBackend against a real Redis: publishing, settling, batching, reclaim, dead-letters."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.backends.message_queue.service.redis import (
    RedisBackend,
    RedisBackendError,
    RedisSettings,
    RedisUnavailableError,
)
from tests.consume_stream import closable
from tests.redis.redis_support import (
    MakeBackend,
    RedisServer,
    eventually,
    free_port,
    stream_entries,
)

pytestmark = pytest.mark.broker


async def _take(stream: AsyncIterator[Any], count: int = 1, timeout: float = 5.0) -> list[Any]:
    async with asyncio.timeout(timeout):
        return [await anext(stream) for _ in range(count)]


# -- publishing -----------------------------------------------------------------------------------


async def test_publish_writes_the_abe_redis_wire_format(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """publish_message stores field data (JSON payload) and one h:<name> field per header."""
    backend = make_backend()
    entry_id = await backend.publish_message(
        f"{prefix}s", {"n": 1, "text": "héllo"}, headers={"traceparent": "00-aa-bb-01"}
    )
    ((stored_id, fields),) = stream_entries(await client.xrange(f"{prefix}s"))
    assert stored_id.decode() == entry_id
    assert json.loads(fields[b"data"]) == {"n": 1, "text": "héllo"}
    assert fields[b"h:traceparent"] == b"00-aa-bb-01"
    assert backend.stats.published == 1


async def test_publish_many_pipelines_in_order_and_validates_everything_first(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """publish_many writes all payloads in order; one invalid payload publishes none."""
    backend = make_backend()
    ids = await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(2500)])
    assert len(ids) == 2500
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert await client.xlen(f"{prefix}s") == 2500
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        await backend.publish_many(f"{prefix}t", [{"n": 1}, {"bad": {1, 2}}])
    assert await client.exists(f"{prefix}t") == 0


async def test_publish_to_a_key_of_the_wrong_type_raises_a_backend_error(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """Redis refusing a write surfaces as RedisBackendError naming the stream."""
    await client.set(f"{prefix}str", "x")
    backend = make_backend()
    with pytest.raises(RedisBackendError, match="str") as info:
        await backend.publish(f"{prefix}str", {"n": 1})
    assert not isinstance(info.value, RedisUnavailableError)
    assert info.value.__cause__ is not None


async def test_publish_without_redis_raises_unavailable_and_hides_the_password() -> None:
    """An unreachable Redis makes publish raise RedisUnavailableError (a ConnectionError)
    whose message names the URL without its password."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    quick = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    backend = RedisBackend(url, consumer="c", client=quick)
    try:
        with pytest.raises(RedisUnavailableError) as info:
            await backend.publish("k", {"n": 1})
        assert isinstance(info.value, ConnectionError)
        assert "hunter2" not in str(info.value)
        assert "127.0.0.1" in str(info.value)
    finally:
        await backend.aclose()
        await quick.aclose()


async def test_maxlen_trims_streams_approximately(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """With maxlen set, publishing keeps a stream near that length."""
    backend = make_backend(maxlen=50)
    await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(1000)])
    assert await client.xlen(f"{prefix}s") < 300


# -- consuming ------------------------------------------------------------------------------------


async def test_deliveries_carry_headers_group_and_publish_time(
    make_backend: MakeBackend, prefix: str
) -> None:
    """A delivery has the payload, its headers, the group read in and the publish time."""
    backend = make_backend(group="billing")
    await backend.publish_message(f"{prefix}s", {"n": 1}, headers={"traceparent": "00-x"})
    stream = backend.deliveries()
    (m,) = await _take(stream)
    await backend.ack(m)
    await closable(stream).aclose()
    assert (m.payload, dict(m.headers), m.group, m.delivery_count) == (
        {"n": 1},
        {"traceparent": "00-x"},
        "billing",
        1,
    )
    assert m.enqueued_at is not None
    assert m.enqueued_at > 1.6e9


async def test_poison_entries_are_yielded_with_the_raw_bytes(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """An undecodable entry comes out of deliveries() with decode_error and its raw data."""
    await client.xadd(f"{prefix}s", {"data": b"\x00not json"})
    backend = make_backend()
    stream = backend.deliveries()
    (m,) = await _take(stream)
    await backend.ack(m)
    await closable(stream).aclose()
    assert m.decode_error is not None
    assert m.raw == b"\x00not json"
    assert backend.stats.poison == 1


async def test_consume_acks_an_entry_once_the_next_one_is_asked_for(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """consume() acknowledges an entry only when the caller comes back for the next one; the
    one being handled when the iterator closes stays pending (delivered again)."""
    backend = make_backend(ack_delay=0)
    await backend.publish_many(f"{prefix}s", [{"n": 1}, {"n": 2}])
    stream = backend.consume()
    first = await anext(stream)
    assert await backend.pending() == 2
    second = await anext(stream)
    await closable(stream).aclose()
    assert (first, second) == ({"n": 1}, {"n": 2})
    pending = await client.xpending_range(f"{prefix}s", "g", "-", "+", 10)
    assert [p["message_id"] for p in pending] == [
        stream_entries(await client.xrange(f"{prefix}s"))[1][0]
    ]


async def test_consume_skips_and_acks_poison(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """consume() logs an undecodable entry, acknowledges it and yields the next payload."""
    await client.xadd(f"{prefix}s", {"data": b"{broken"})
    backend = make_backend()
    await backend.publish(f"{prefix}s", {"n": 2})
    stream = backend.consume()
    assert await _take(stream) == [{"n": 2}]
    await closable(stream).aclose()
    assert backend.stats.acked == 1  # the poison entry, sent when the iterator closed


async def test_each_group_gets_every_entry(make_backend: MakeBackend, prefix: str) -> None:
    """Two consumer groups on one stream each receive every entry, from the beginning."""
    backend = make_backend()
    await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(3)])
    for group in ("one", "two"):
        stream = backend.consume(group=group)
        assert await _take(stream, 3) == [{"n": n} for n in range(3)]
        await closable(stream).aclose()


# -- batched acknowledgements ---------------------------------------------------------------------


async def test_acks_ride_along_with_the_next_read_as_one_xack(
    make_backend: MakeBackend, prefix: str
) -> None:
    """Acks are buffered and sent as one multi-id XACK with the next read."""
    backend = make_backend(batch_size=5, ack_delay=60)
    await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(6)])
    stream = backend.deliveries()
    batch = await _take(stream, 5)
    for m in batch:
        await backend.ack(m)
    assert await backend.pending() == 5  # buffered, not sent yet
    (sixth,) = await _take(stream)
    assert await backend.pending() == 1
    assert (backend.stats.acked, backend.stats.ack_round_trips) == (5, 1)
    await backend.ack(sixth)
    await closable(stream).aclose()
    assert await backend.pending() == 0


async def test_buffered_acks_are_flushed_after_ack_delay(
    make_backend: MakeBackend, prefix: str
) -> None:
    """Without another read, buffered acks go out on their own after ack_delay."""
    backend = make_backend(ack_delay=0)
    await backend.publish(f"{prefix}s", {"n": 1})
    stream = backend.deliveries()
    (m,) = await _take(stream)
    await backend.ack(m)

    async def flushed() -> bool:
        return await backend.pending() == 0

    await eventually(flushed, what="the delayed ack flush")
    await closable(stream).aclose()


async def test_a_full_ack_buffer_is_flushed_at_once(make_backend: MakeBackend, prefix: str) -> None:
    """Reaching ack_batch sends the buffered acks immediately."""
    backend = make_backend(batch_size=10, ack_batch=3, ack_delay=60)
    await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(5)])
    stream = backend.deliveries()
    batch = await _take(stream, 5)
    for m in batch[:3]:
        await backend.ack(m)
    assert await backend.pending() == 2
    await closable(stream).aclose()


async def test_ack_nowait_buffers_like_ack_and_rides_along_with_the_next_read(
    make_backend: MakeBackend, prefix: str
) -> None:
    """ack_nowait (what ResilientConsumer calls on its hot path) buffers without a round trip;
    the acks go out as one XACK with the next read."""
    backend = make_backend(batch_size=5, ack_delay=60)
    await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(6)])
    stream = backend.deliveries()
    for m in await _take(stream, 5):
        backend.ack_nowait(m)
    assert await backend.pending() == 5
    (sixth,) = await _take(stream)
    assert await backend.pending() == 1
    assert (backend.stats.acked, backend.stats.ack_round_trips) == (5, 1)
    backend.ack_nowait(sixth)
    await closable(stream).aclose()
    assert await backend.pending() == 0


async def test_ack_nowait_sends_in_a_task_what_cannot_wait(
    make_backend: MakeBackend, prefix: str
) -> None:
    """A full buffer, and a delivery that did not come from this backend's reader, are
    acknowledged by a background task; aclose() waits for it."""
    backend = make_backend(batch_size=10, ack_batch=2, ack_delay=60)
    await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(3)])
    stream = backend.deliveries()
    first, second, third = await _take(stream, 3)
    backend.ack_nowait(first)
    backend.ack_nowait(second)  # the buffer is full: flushed by a task

    async def two_acked() -> bool:
        return await backend.pending() == 1

    await eventually(two_acked, what="the background flush")
    detached = InboundMessage(third.payload, third.key, third.message_id, group="g")
    backend.ack_nowait(detached)  # no reader handle: a plain XACK in a task
    await backend.aclose()
    assert await make_backend().pending() == 0
    assert backend.stats.acked == 3


async def test_a_failed_background_ack_is_logged_and_the_entry_stays_pending(
    make_backend: MakeBackend, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When Redis refuses an acknowledgement ack_nowait sent in a task, a warning names the
    entry (it will be delivered again); nothing is raised into the consumer."""
    backend = make_backend()
    await backend.publish(f"{prefix}s", {"n": 1})
    stream = backend.deliveries()
    (m,) = await _take(stream)
    wrong = InboundMessage(m.payload, f"{prefix}missing", m.message_id, group="g")
    await backend.client.set(f"{prefix}missing", "not a stream")
    with caplog.at_level("WARNING"):
        backend.ack_nowait(wrong)
        await backend.aclose()
    assert any(
        m.message_id in r.getMessage() and "delivered again" in r.getMessage()
        for r in caplog.records
    )
    await closable(stream).aclose()
    assert await make_backend().pending() == 1


async def test_ack_twice_or_after_dead_letter_is_a_no_op(
    make_backend: MakeBackend, prefix: str
) -> None:
    """A second settlement of one delivery sends nothing."""
    backend = make_backend()
    await backend.publish_many(f"{prefix}s", [{"n": 1}, {"n": 2}])
    stream = backend.deliveries()
    first, second = await _take(stream, 2)
    await backend.ack(first)
    await backend.ack(first)
    await backend.dead_letter(second, f"{prefix}dlq", {"why": "test"})
    await backend.ack(second)
    await backend.flush()
    await closable(stream).aclose()
    assert backend.stats.acked == 1
    assert backend.stats.ack_round_trips == 1


async def test_closing_flushes_acks_and_hands_back_unread_entries(
    make_backend: MakeBackend, prefix: str
) -> None:
    """aclose() sends buffered acks and gives entries read but never handed out back to the
    group, where another consumer takes them at once."""
    first = make_backend(batch_size=5, ack_delay=60)
    await first.publish_many(f"{prefix}s", [{"n": n} for n in range(5)])
    stream = first.deliveries()
    (m,) = await _take(stream)
    await first.ack(m)
    await first.aclose()
    second = make_backend(claim_idle=60)
    assert await second.pending() == 4
    stream = second.deliveries()
    rest = await _take(stream, 4)
    for r in rest:
        await second.ack(r)
    await closable(stream).aclose()
    assert [r.payload["n"] for r in rest] == [1, 2, 3, 4]
    assert {r.delivery_count for r in rest} == {2}
    assert second.stats.reclaimed == 4


# -- release, reclaim, keep-alive -----------------------------------------------------------------


async def test_released_entry_goes_back_to_the_whole_group(
    make_backend: MakeBackend, prefix: str
) -> None:
    """release() makes the entry available at once to any consumer of the group, with its
    delivery count raised (no claim_idle wait)."""
    holder = make_backend(claim_idle=60)
    await holder.publish(f"{prefix}s", {"n": 1})
    stream = holder.deliveries()
    (m,) = await _take(stream)
    await holder.release(m)
    await closable(stream).aclose()
    other = make_backend(claim_idle=60)
    stream = other.deliveries()
    (again,) = await _take(stream)
    await other.ack(again)
    await closable(stream).aclose()
    assert (again.message_id, again.delivery_count) == (m.message_id, 2)
    assert holder.stats.released == 1


async def test_entries_of_a_dead_consumer_are_reclaimed_and_counted(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """Entries another consumer read and never acked are reclaimed once idle for claim_idle,
    with delivery counts from the pending-entries list, and counted."""
    backend = make_backend(claim_idle=0.05)
    await backend.publish_many(f"{prefix}s", [{"n": n} for n in range(3)])
    await client.xgroup_create(f"{prefix}s", "g", id="0")
    await client.xreadgroup("g", "ghost", {f"{prefix}s": ">"}, count=3)
    await client.xclaim(
        f"{prefix}s",
        "g",
        "ghost",
        0,
        [stream_entries(await client.xrange(f"{prefix}s"))[0][0]],
        retrycount=4,
    )
    await asyncio.sleep(0.06)  # Redis measures idle time on its own clock
    stream = backend.deliveries()
    got = await _take(stream, 3)
    for m in got:
        await backend.ack(m)
    await closable(stream).aclose()
    assert [m.payload["n"] for m in got] == [0, 1, 2]
    assert [m.delivery_count for m in got] == [5, 2, 2]
    assert backend.stats.reclaimed == 3
    assert await backend.pending() == 0


async def test_entries_deleted_while_pending_are_counted_not_delivered(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """A pending entry trimmed from its stream is dropped from the PEL and counted."""
    backend = make_backend(claim_idle=0.05)
    await backend.publish_many(f"{prefix}s", [{"n": 1}, {"n": 2}])
    await client.xgroup_create(f"{prefix}s", "g", id="0")
    await client.xreadgroup("g", "ghost", {f"{prefix}s": ">"}, count=2)
    first_id = stream_entries(await client.xrange(f"{prefix}s"))[0][0]
    await client.xdel(f"{prefix}s", first_id)
    await asyncio.sleep(0.06)
    stream = backend.deliveries()
    (m,) = await _take(stream)
    await backend.ack(m)
    await closable(stream).aclose()
    assert m.payload == {"n": 2}
    assert backend.stats.deleted_while_pending == 1
    assert await backend.pending() == 0


async def test_held_entries_are_kept_alive_and_not_reclaimed(
    make_backend: MakeBackend, prefix: str
) -> None:
    """An entry a live consumer is still working on is not reclaimed by others, however long
    it takes: the holder refreshes it every claim_idle / 3."""
    holder = make_backend(claim_idle=0.15)
    await holder.publish(f"{prefix}s", {"n": 1})
    stream = holder.deliveries()
    (m,) = await _take(stream)
    await asyncio.sleep(0.45)  # three claim_idle periods of slow work
    other = make_backend(claim_idle=0.15)
    other_stream = other.deliveries()
    with pytest.raises(TimeoutError):
        await _take(other_stream, timeout=0.3)
    await holder.ack(m)
    await closable(stream).aclose()
    await closable(other_stream).aclose()
    assert other.stats.reclaimed == 0


# -- dead-lettering -------------------------------------------------------------------------------


async def test_dead_letter_writes_the_record_and_acks_in_one_step(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """dead_letter appends the record (with the message's headers) and acknowledges the
    source entry together."""
    backend = make_backend()
    await backend.publish_message(f"{prefix}s", {"n": 1}, headers={"traceparent": "00-t"})
    stream = backend.deliveries()
    (m,) = await _take(stream)
    record_id = await backend.dead_letter(m, f"{prefix}s.dlq", {"reason": "boom", "n": 1})
    ((stored_id, fields),) = stream_entries(await client.xrange(f"{prefix}s.dlq"))
    assert stored_id.decode() == record_id
    assert json.loads(fields[b"data"]) == {"reason": "boom", "n": 1}
    assert fields[b"h:traceparent"] == b"00-t"
    assert await backend.pending() == 0
    assert backend.stats.dead_lettered == 1
    await closable(stream).aclose()


async def test_a_failed_dead_letter_writes_nothing_and_acks_nothing(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """When the dead-letter write fails the source entry stays pending and can be released."""
    await client.set(f"{prefix}blocked", "not a stream")
    backend = make_backend()
    await backend.publish(f"{prefix}s", {"n": 1})
    stream = backend.deliveries()
    (m,) = await _take(stream)
    with pytest.raises(RedisBackendError, match="dead-lettering"):
        await backend.dead_letter(m, f"{prefix}blocked", {"reason": "boom"})
    assert await backend.pending() == 1
    assert await client.get(f"{prefix}blocked") == b"not a stream"
    await backend.release(m)
    (again,) = await _take(stream)
    await backend.ack(again)
    await closable(stream).aclose()
    assert again.message_id == m.message_id


# -- connection trouble ---------------------------------------------------------------------------


async def test_reading_survives_a_deleted_stream_and_group(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """When the stream (and so the group) vanishes, the reader recreates the group and goes
    on with new entries."""
    backend = make_backend()
    await backend.publish(f"{prefix}s", {"n": 1})
    stream = backend.deliveries()
    (m,) = await _take(stream)
    await backend.ack(m)
    await backend.flush()
    await client.delete(f"{prefix}s")
    await client.xadd(f"{prefix}s", {"data": b'{"n": 2}'})
    (again,) = await _take(stream)
    await backend.ack(again)
    await closable(stream).aclose()
    assert again.payload == {"n": 2}


async def test_reading_backs_off_exponentially_while_redis_is_down() -> None:
    """Without Redis the reader retries with jittered, doubling, capped waits and counts them."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    quick = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    settings = RedisSettings(
        url=url, streams=("s",), consumer="c", reconnect_initial=0.1, reconnect_max=0.8
    )
    backend = RedisBackend(settings=settings, client=quick, sleep=fake_sleep)

    async def first_delivery() -> InboundMessage:
        return await anext(backend.deliveries())

    reader = asyncio.create_task(first_delivery())

    async def enough() -> bool:
        return len(sleeps) >= 6

    await eventually(enough, what="six reconnection attempts")
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await backend.aclose()
    await quick.aclose()
    caps = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    for wait, cap in zip(sleeps, caps, strict=False):
        assert cap / 2 <= wait <= cap
    assert backend.stats.reconnects >= 6


async def test_backend_is_an_async_context_manager_and_closes_once(
    make_backend: MakeBackend, prefix: str
) -> None:
    """async with closes the backend; closing twice is fine; a closed backend reads no more."""
    async with make_backend() as backend:
        await backend.publish(f"{prefix}s", {"n": 1})
    await backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.deliveries()


async def test_closing_the_backend_ends_its_open_iterators(
    make_backend: MakeBackend, prefix: str
) -> None:
    """aclose() on the backend makes an iterator it handed out end instead of reading on."""
    backend = make_backend()
    await backend.publish(f"{prefix}s", {"n": 1})
    stream = backend.deliveries()
    (m,) = await _take(stream)
    await backend.ack(m)
    await backend.aclose()
    with pytest.raises(StopAsyncIteration):
        await _take(stream)
    assert backend.stats.acked == 1


async def test_pending_of_a_missing_stream_is_zero(make_backend: MakeBackend, prefix: str) -> None:
    """pending() reports 0 for a stream or group that does not exist yet."""
    assert await make_backend().pending(f"{prefix}nothing") == 0


# -- authentication -------------------------------------------------------------------------------

PASSWORD = "p@ss/w:rd#1?%"


@pytest.fixture
def secured_server(tmp_path: Path, redis_url: str) -> Iterator[RedisServer]:
    """A private redis-server that requires PASSWORD (a password full of URL characters)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail("redis-server is not on PATH; CI=true, so the password test must run")
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path, password=PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_from_env_with_a_password_publishes_and_consumes(
    secured_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REDIS_URL without a password plus REDIS_PASSWORD (with '@', '/', ':' and '%' in it)
    authenticates both publishing and consuming."""
    monkeypatch.setenv("REDIS_URL", secured_server.url)
    monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
    monkeypatch.setenv("REDIS_STREAMS", "secured")
    async with RedisBackend.from_env() as backend:
        await backend.publish("secured", {"n": 1})
        stream = backend.deliveries()
        (message,) = await _take(stream)
        await backend.ack(message)
        await closable(stream).aclose()
    assert message.payload == {"n": 1}
    assert PASSWORD not in repr(backend)


async def test_a_wrong_password_fails_clearly_instead_of_retrying(
    secured_server: RedisServer,
) -> None:
    """Wrong credentials are not an outage: publish raises RedisBackendError (not the retryable
    RedisUnavailableError) and a reader stops with RedisBackendError instead of backing off
    forever; neither message shows the password."""
    url = secured_server.url.replace("redis://", "redis://:wrong-secret@")
    backend = RedisBackend(url, streams=["secured"], consumer="c")
    with pytest.raises(RedisBackendError) as published:
        await backend.publish("secured", {"n": 1})
    assert not isinstance(published.value, RedisUnavailableError)
    with pytest.raises(RedisBackendError, match="refused the connection") as read:
        async with asyncio.timeout(5):
            await anext(backend.deliveries())
    for error in (published.value, read.value):
        assert "wrong-secret" not in str(error)
    assert backend.stats.reconnects == 0
    await backend.aclose()
