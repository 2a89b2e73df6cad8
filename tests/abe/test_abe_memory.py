"""Tests for MemoryBackend, the in-process provider, and its at-least-once extensions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

import pytest

from abe.backends.message_queue.base import (
    DeadLetteringBackend,
    HeaderPublishingBackend,
    SettlingBackend,
)
from abe.backends.message_queue.service.memory import MemoryBackend, MemoryChannel
from abe.types import MessageQueueBackendProtocol
from tests.consume_stream import closable

T = TypeVar("T")

# A bound on waits that should finish at once, so a regression fails instead of hanging.
GUARD = 5.0


async def take(iterator: AsyncIterator[T], count: int = 1) -> list[T]:
    """Read ``count`` items from ``iterator``, failing instead of hanging when they never come."""
    async with asyncio.timeout(GUARD):
        return [await anext(iterator) for _ in range(count)]


async def until_waiting(channel: MemoryChannel) -> None:
    """Yield to the loop until a consumer is parked waiting on ``channel``."""
    async with asyncio.timeout(GUARD):
        while not channel._waiters:
            await asyncio.sleep(0)


@pytest.fixture
def backend() -> MemoryBackend:
    """A MemoryBackend with a private queue."""
    return MemoryBackend.isolated()


# -- plain protocol ---------------------------------------------------------------------------


async def test_memory_backend_satisfies_every_protocol(backend: MemoryBackend) -> None:
    """MemoryBackend passes the runtime checks of the base protocol and all three extensions."""
    assert isinstance(backend, MessageQueueBackendProtocol)
    assert isinstance(backend, SettlingBackend)
    assert isinstance(backend, DeadLetteringBackend)
    assert isinstance(backend, HeaderPublishingBackend)


async def test_consume_preserves_publish_order(backend: MemoryBackend) -> None:
    """consume() yields payloads in the order they were published."""
    for n in range(10):
        await backend.publish("orders", {"n": n})
    async with aclosing(closable(backend.consume())) as stream:
        assert await take(stream, 10) == [{"n": n} for n in range(10)]


async def test_consume_preserves_publish_order_across_keys(backend: MemoryBackend) -> None:
    """A consumer of every key sees messages of different keys in global publish order."""
    keys = ["a", "b", "a", "c", "b"]
    for n, key in enumerate(keys):
        await backend.publish(key, {"n": n})
    async with aclosing(closable(backend.consume())) as stream:
        assert [p["n"] for p in await take(stream, len(keys))] == list(range(len(keys)))


async def test_consume_waits_for_a_later_publish(backend: MemoryBackend) -> None:
    """A consumer parked on an empty queue receives a message published afterwards."""
    async with aclosing(closable(backend.consume())) as stream:
        reader = asyncio.create_task(take(stream))
        await until_waiting(backend.channel)
        await backend.publish("k", {"late": True})
        assert await reader == [{"late": True}]


async def test_cancelled_consumer_leaves_no_waiter_and_next_consumer_gets_messages(
    backend: MemoryBackend,
) -> None:
    """Cancelling a waiting consumer removes its waiter and later messages reach a new consumer."""
    reader = asyncio.create_task(take(backend.consume()))
    await until_waiting(backend.channel)

    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader

    assert backend.channel._waiters == []
    await backend.publish("k", {"n": 1})
    assert backend.size() == 1
    async with aclosing(closable(backend.consume())) as stream:
        assert await take(stream) == [{"n": 1}]


async def test_consumer_cancelled_after_being_woken_loses_no_message(
    backend: MemoryBackend,
) -> None:
    """A consumer cancelled between its wake-up and its read leaves the message queued."""
    reader = asyncio.create_task(take(backend.consume()))
    await until_waiting(backend.channel)

    await backend.publish("k", {"n": 1})  # wakes the reader, which has not run yet
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader

    assert backend.size("k") == 1
    async with aclosing(closable(backend.consume())) as stream:
        assert await take(stream) == [{"n": 1}]


async def test_concurrent_publishers_and_consumers_deliver_each_message_exactly_once(
    backend: MemoryBackend,
) -> None:
    """Many concurrent publishers and consumers: every message is consumed exactly once."""
    publishers, per_publisher, consumers = 20, 50, 4
    total = publishers * per_publisher
    received: list[tuple[int, int]] = []
    everything = asyncio.Event()

    async def publish(p: int) -> None:
        for i in range(per_publisher):
            await backend.publish(f"key-{p % 3}", {"p": p, "i": i})
            if i % 7 == 0:
                await asyncio.sleep(0)

    async def consume() -> None:
        async for payload in backend.consume():
            received.append((payload["p"], payload["i"]))
            if len(received) == total:
                everything.set()
            await asyncio.sleep(0)

    readers = [asyncio.create_task(consume()) for _ in range(consumers)]
    try:
        async with asyncio.timeout(GUARD):
            await asyncio.gather(*(publish(p) for p in range(publishers)))
            await everything.wait()
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    assert len(received) == total
    assert set(received) == {(p, i) for p in range(publishers) for i in range(per_publisher)}
    assert backend.size() == 0
    assert backend.channel._waiters == []


# -- shared and isolated queues -----------------------------------------------------------------


async def test_default_instances_share_one_queue() -> None:
    """Two MemoryBackend() instances read and write the same process-wide queue."""
    writer, reader = MemoryBackend(), MemoryBackend()
    await writer.publish("k", {"shared": True})
    assert reader.size() == 1
    async with aclosing(closable(reader.consume())) as stream:
        assert await take(stream) == [{"shared": True}]


async def test_isolated_instances_do_not_share() -> None:
    """MemoryBackend.isolated() instances have private queues, apart from the shared one."""
    shared, first, second = MemoryBackend(), MemoryBackend.isolated(), MemoryBackend.isolated()
    await first.publish("k", {"from": "first"})
    assert (shared.size(), first.size(), second.size()) == (0, 1, 0)
    await shared.publish("k", {"from": "shared"})
    assert (shared.size(), first.size(), second.size()) == (1, 1, 0)


async def test_reset_shared_gives_new_instances_an_empty_queue() -> None:
    """reset_shared() drops what the shared queue held."""
    await MemoryBackend().publish("k", {"n": 1})
    MemoryBackend.reset_shared()
    assert MemoryBackend().size() == 0


async def test_from_env_warns_and_uses_the_shared_queue() -> None:
    """from_env() warns that MemoryBackend is for development and returns a shared-queue backend."""
    with pytest.warns(UserWarning, match="development/testing only"):
        backend = MemoryBackend.from_env()
    await MemoryBackend().publish("k", {"n": 1})
    assert backend.size() == 1


# -- keys --------------------------------------------------------------------------------------


async def test_keys_restrict_what_is_consumed(backend: MemoryBackend) -> None:
    """A backend built with keys= reads only those keys and leaves the others queued."""
    await backend.publish("orders", {"n": 1})
    await backend.publish("orders.dlq", {"n": 2})
    await backend.publish("audit", {"n": 3})
    orders = backend.view(keys=["orders", "audit"])
    async with aclosing(closable(orders.consume())) as stream:
        assert await take(stream, 2) == [{"n": 1}, {"n": 3}]
    assert backend.size() == 1
    assert [m.payload for m in backend.peek("orders.dlq")] == [{"n": 2}]


async def test_isolated_accepts_keys() -> None:
    """isolated(keys=...) filters deliveries() as well as consume()."""
    backend = MemoryBackend.isolated(keys={"wanted"})
    await backend.publish("other", {"n": 1})
    await backend.publish("wanted", {"n": 2})
    async with aclosing(backend.deliveries()) as stream:
        (message,) = await take(stream)
    assert message.key == "wanted"
    assert backend.size("other") == 1


async def test_keys_as_a_single_string_is_rejected() -> None:
    """keys='orders' raises TypeError instead of reading the keys 'o', 'r', 'd', ..."""
    with pytest.raises(TypeError, match="not a single string"):
        MemoryBackend.isolated(keys="orders")


async def test_empty_keys_are_rejected() -> None:
    """keys=[] raises ValueError instead of building a backend that never reads anything."""
    with pytest.raises(ValueError, match="at least one key"):
        MemoryBackend.isolated(keys=[])


# -- publishing with headers and bad input ------------------------------------------------------


async def test_publish_message_headers_round_trip(backend: MemoryBackend) -> None:
    """publish_message() headers and id come back on the delivery, copied from the caller's dict."""
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    message_id = await backend.publish_message("k", {"n": 1}, headers=headers)
    headers["traceparent"] = "mutated"
    async with aclosing(backend.deliveries()) as stream:
        (message,) = await take(stream)
    assert message.message_id == message_id
    assert message.headers == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    }
    assert message.payload == {"n": 1}
    assert message.key == "k"
    assert message.delivery_count == 1
    assert message.enqueued_at is not None


async def test_plain_publish_gives_empty_headers(backend: MemoryBackend) -> None:
    """A message published without headers is delivered with an empty mapping, never None."""
    await backend.publish("k", {"n": 1})
    async with aclosing(backend.deliveries()) as stream:
        (message,) = await take(stream)
    assert message.headers == {}


@pytest.mark.parametrize("key", ["", 42, None, b"orders"], ids=repr)
async def test_bad_key_raises_a_clear_error(backend: MemoryBackend, key: Any) -> None:
    """A key that is not a non-empty string is rejected with a message naming the value."""
    with pytest.raises(ValueError, match=r"key must be a non-empty string, got"):
        await backend.publish(key, {"n": 1})
    assert backend.size() == 0


@pytest.mark.parametrize("payload", [[1, 2], "text", None, 3], ids=repr)
async def test_bad_payload_type_raises_a_clear_error(backend: MemoryBackend, payload: Any) -> None:
    """A payload that is not a dict is rejected with TypeError naming its type."""
    with pytest.raises(TypeError, match=f"payload must be a dict, got {type(payload).__name__}"):
        await backend.publish("k", payload)
    assert backend.size() == 0


# -- settlement --------------------------------------------------------------------------------


async def test_deliveries_stay_unacked_until_acked(backend: MemoryBackend) -> None:
    """deliveries() hands messages out as unacked and ack() forgets them for good."""
    await backend.publish("k", {"n": 1})
    await backend.publish("k", {"n": 2})
    async with aclosing(backend.deliveries()) as stream:
        first, second = await take(stream, 2)
        assert backend.unacked() == [first, second]
        assert backend.size() == 0

        await backend.ack(first)
        assert backend.unacked() == [second]
        assert backend.recover() == 1
        (again,) = await take(stream)
    assert again.payload == {"n": 2}
    assert backend.size() == 0


@pytest.mark.parametrize("group", [None, "workers"])
async def test_next_nowait_records_each_delivery_as_unacked(
    backend: MemoryBackend, group: str | None
) -> None:
    """next_nowait() (with or without a group) hands out each waiting message once, records it
    as unacked before returning it, and returns None once nothing waits."""
    for n in range(3):
        await backend.publish("k", {"n": n})
    stream = backend.deliveries(group=group)
    taken = [stream.next_nowait() for _ in range(3)]
    assert stream.next_nowait() is None
    assert [m.payload["n"] for m in taken if m is not None] == [0, 1, 2]
    assert [m.group for m in taken if m is not None] == [group] * 3
    assert backend.unacked() == taken
    backend.ack_nowait(taken[1])  # type: ignore[arg-type]
    assert backend.unacked() == [taken[0], taken[2]]
    await stream.aclose()


async def test_release_redelivers_first_with_a_raised_delivery_count(
    backend: MemoryBackend,
) -> None:
    """A released delivery comes back before newer messages with delivery_count + 1."""
    await backend.publish("k", {"n": 1})
    await backend.publish("k", {"n": 2})
    async with aclosing(backend.deliveries()) as stream:
        (first,) = await take(stream)
        await backend.release(first)
        assert backend.unacked() == []
        redelivered, second = await take(stream, 2)
    assert redelivered.payload == {"n": 1}
    assert redelivered.message_id == first.message_id
    assert redelivered.delivery_count == 2
    assert second.payload == {"n": 2}
    assert second.delivery_count == 1


async def test_release_after_ack_does_not_redeliver(backend: MemoryBackend) -> None:
    """Releasing an already acked delivery is a no-op."""
    await backend.publish("k", {"n": 1})
    async with aclosing(backend.deliveries()) as stream:
        (message,) = await take(stream)
    await backend.ack(message)
    await backend.release(message)
    assert backend.size() == 0
    assert backend.unacked() == []


async def test_release_wakes_a_waiting_consumer(backend: MemoryBackend) -> None:
    """A consumer parked on an empty queue receives a delivery released by another consumer."""
    await backend.publish("k", {"n": 1})
    async with aclosing(backend.deliveries()) as first_stream:
        (message,) = await take(first_stream)
    async with aclosing(backend.deliveries()) as stream:
        reader = asyncio.create_task(take(stream))
        await until_waiting(backend.channel)
        await backend.release(message)
        (redelivered,) = await reader
    assert redelivered.payload == {"n": 1}
    assert redelivered.delivery_count == 2


async def test_recover_requeues_every_unacked_delivery_in_order(backend: MemoryBackend) -> None:
    """recover() puts all unacked deliveries back, oldest first, ahead of waiting messages."""
    for n in range(3):
        await backend.publish("k", {"n": n})
    await backend.publish("other", {"n": 3})
    async with aclosing(backend.deliveries()) as stream:
        handed_out = await take(stream, 2)
    assert len(backend.unacked()) == 2

    assert backend.recover() == 2

    assert backend.unacked() == []
    async with aclosing(backend.deliveries()) as stream:
        again = await take(stream, 4)
    assert [m.payload["n"] for m in again] == [0, 1, 2, 3]
    assert [m.delivery_count for m in again] == [2, 2, 1, 1]
    assert [m.message_id for m in again[:2]] == [m.message_id for m in handed_out]


async def test_recover_with_nothing_unacked_returns_zero(backend: MemoryBackend) -> None:
    """recover() on a backend with no unacked deliveries changes nothing."""
    await backend.publish("k", {"n": 1})
    assert backend.recover() == 0
    assert backend.size() == 1


async def test_group_is_recorded_on_deliveries_and_not_kept_on_redelivery(
    backend: MemoryBackend,
) -> None:
    """A delivery carries the group it was read in; released or recovered copies do not keep it."""
    await backend.publish("k", {"n": 1})
    await backend.publish("k", {"n": 2})
    async with aclosing(backend.deliveries(group="workers")) as stream:
        first, second = await take(stream, 2)
    assert (first.group, second.group) == ("workers", "workers")

    await backend.release(first)
    backend.recover()
    async with aclosing(backend.deliveries()) as stream:
        again = sorted(await take(stream, 2), key=lambda m: m.payload["n"])
    assert [(m.payload["n"], m.delivery_count, m.group) for m in again] == [
        (1, 2, None),
        (2, 2, None),
    ]


async def test_dead_letter_writes_the_record_and_acks_the_message(backend: MemoryBackend) -> None:
    """dead_letter() queues the record under the destination and settles the source message."""
    await backend.publish("orders", {"n": 1})
    consumer = backend.view(keys=["orders"])
    async with aclosing(consumer.deliveries()) as stream:
        (message,) = await take(stream)

    record_id = await consumer.dead_letter(message, "orders.dlq", {"payload": {"n": 1}})

    assert backend.unacked() == []
    (dead,) = backend.peek("orders.dlq")
    assert dead.payload == {"payload": {"n": 1}}
    assert dead.message_id == record_id
    assert backend.recover() == 0
    assert backend.size("orders") == 0


async def test_dead_letter_that_fails_to_write_leaves_the_message_unacked(
    backend: MemoryBackend,
) -> None:
    """When the dead-letter write fails, the source message is not acknowledged either."""
    await backend.publish("orders", {"n": 1})
    async with aclosing(backend.deliveries()) as stream:
        (message,) = await take(stream)

    with pytest.raises(ValueError, match="key must be a non-empty string"):
        await backend.dead_letter(message, "", {"payload": {"n": 1}})

    assert backend.unacked() == [message]
