"""MemoryBackend against the published package's observable behaviour, and its key index.

The published ``MemoryBackend`` keeps a class-level ``_queue`` (an ``asyncio.Queue`` of
``(key, payload)`` pairs) that its users inspect (``qsize()``), instrument (``task_done()``) and
replace (``MemoryBackend._queue = asyncio.Queue()`` to start empty). These tests hold the
drop-in to that, and check the per-key index that keeps every pop O(1) against a plain model.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from abe.backends.message_queue.service.memory import MemoryBackend, MemoryChannel
from tests.consume_stream import closable

T = TypeVar("T")
GUARD = 5.0


async def take(iterator: AsyncIterator[T], count: int = 1) -> list[T]:
    """Read ``count`` items from ``iterator``, failing instead of hanging."""
    async with asyncio.timeout(GUARD):
        return [await anext(iterator) for _ in range(count)]


# -- the class-level _queue ---------------------------------------------------------------------


async def test_queue_is_class_level_and_shared_by_default_instances() -> None:
    """MemoryBackend()._queue is the class attribute, the same object for every instance."""
    first, second = MemoryBackend(), MemoryBackend()
    assert first._queue is second._queue
    assert first._queue is MemoryBackend._queue
    assert MemoryBackend.isolated()._queue is not MemoryBackend._queue


async def test_qsize_counts_waiting_messages() -> None:
    """_queue.qsize() is 0, then 5 after five publishes, then 4 after one is consumed."""
    backend = MemoryBackend()
    assert backend._queue.qsize() == 0
    for i in range(5):
        await backend.publish(f"key-{i}", {"id": i})
    assert backend._queue.qsize() == 5
    async with aclosing(closable(backend.consume())) as stream:
        assert await take(stream) == [{"id": 0}]
    assert backend._queue.qsize() == 4


async def test_task_done_is_called_once_per_consumed_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """consume() calls _queue.task_done() for every message it yields, looked up on the queue."""
    backend = MemoryBackend()
    calls = 0
    original = backend._queue.task_done

    def counting() -> None:
        nonlocal calls
        calls += 1
        original()

    monkeypatch.setattr(backend._queue, "task_done", counting)
    for i in range(5):
        await backend.publish(f"key-{i}", {"id": i})
    async with aclosing(closable(backend.consume())) as stream:
        await take(stream, 5)
    assert calls == 5


async def test_a_failing_task_done_is_logged_and_consumption_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A task_done() raising ValueError is logged as a warning; the message is still yielded."""
    backend = MemoryBackend()

    def too_many() -> None:
        raise ValueError("task_done() called too many times")

    monkeypatch.setattr(backend._queue, "task_done", too_many)
    await backend.publish("k", {"n": 1})
    with caplog.at_level(logging.WARNING, logger="abe.backends.message_queue.service.memory"):
        async with aclosing(closable(backend.consume())) as stream:
            assert await take(stream) == [{"n": 1}]
    assert "task_done() called too many times" in caplog.text


async def test_from_env_warning_says_development_testing_only() -> None:
    """from_env() warns with a UserWarning whose text contains 'development/testing only'."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MemoryBackend.from_env()
    assert len(caught) == 1
    assert issubclass(caught[0].category, UserWarning)
    assert "development/testing only" in str(caught[0].message)


async def test_replacing_queue_with_asyncio_queue_starts_empty_and_works() -> None:
    """MemoryBackend._queue = asyncio.Queue() (the published reset) gives working instances."""
    await MemoryBackend().publish("old", {"n": 0})
    MemoryBackend._queue = asyncio.Queue()  # type: ignore[assignment]
    backend = MemoryBackend()
    assert backend._queue.qsize() == 0
    assert backend._queue is MemoryBackend()._queue
    await backend.publish("k", {"n": 1})
    assert backend._queue.qsize() == 1
    async with aclosing(closable(backend.consume())) as stream:
        assert await take(stream) == [{"n": 1}]


async def test_messages_put_in_a_replacement_queue_are_carried_over() -> None:
    """(key, payload) pairs already in an assigned asyncio.Queue are consumed, in order."""
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    queue.put_nowait(("a", {"n": 1}))
    queue.put_nowait(("b", {"n": 2}))
    MemoryBackend._queue = queue  # type: ignore[assignment]
    backend = MemoryBackend()
    assert backend._queue.qsize() == 2
    async with aclosing(closable(backend.consume())) as stream:
        assert await take(stream, 2) == [{"n": 1}, {"n": 2}]


async def test_replacing_queue_with_something_else_is_a_clear_error() -> None:
    """A _queue that is not a queue makes MemoryBackend() raise TypeError naming the type."""
    MemoryBackend._queue = ["not", "a", "queue"]  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"asyncio.Queue of \(key, payload\) pairs, got list"):
        MemoryBackend()


async def test_queue_api_put_get_and_empty() -> None:
    """put((key, payload)) / get() / get_nowait() speak the published (key, payload) pairs."""
    queue = MemoryBackend()._queue
    assert queue.empty()
    assert not queue.full()
    assert queue.maxsize == 0
    await queue.put(("orders", {"n": 1}))
    queue.put_nowait(("audit", {"n": 2}))
    assert await queue.get() == ("orders", {"n": 1})
    assert queue.get_nowait() == ("audit", {"n": 2})
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    queue.task_done()
    queue.task_done()
    with pytest.raises(ValueError, match="called too many times"):
        queue.task_done()


async def test_queue_api_put_validates_like_publish() -> None:
    """put_nowait() rejects an empty key and a payload that is not a dict, as publish() does."""
    queue = MemoryChannel()
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        queue.put_nowait(("", {"n": 1}))
    with pytest.raises(TypeError, match="payload must be a dict"):
        queue.put_nowait(("k", [1]))  # type: ignore[arg-type]
    assert queue.qsize() == 0


async def test_join_waits_for_task_done_of_every_message() -> None:
    """join() returns only after every message taken with get() is marked task_done()."""
    queue = MemoryChannel()
    queue.put_nowait(("k", {"n": 1}))
    joined = asyncio.create_task(queue.join())
    await queue.get()
    await asyncio.sleep(0)
    assert not joined.done()
    queue.task_done()
    async with asyncio.timeout(GUARD):
        await joined


async def test_join_waits_for_deliveries_to_be_acked_not_released() -> None:
    """With deliveries(), join() returns once every delivery is acked; a release is not enough."""
    backend = MemoryBackend.isolated()
    await backend.publish("k", {"n": 1})
    joined = asyncio.create_task(backend._queue.join())
    async with aclosing(backend.deliveries()) as stream:
        (first,) = await take(stream)
        await backend.release(first)
        await asyncio.sleep(0)
        assert not joined.done()
        (again,) = await take(stream)
    backend.ack_nowait(again)
    async with asyncio.timeout(GUARD):
        await joined
    assert backend.unacked() == []


# -- the key index against a model ------------------------------------------------------------

_KEYS = ("a", "b", "c", "d")
_operation = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(_KEYS)),
    st.tuples(st.just("take"), st.none()),
    st.tuples(st.just("take"), st.frozensets(st.sampled_from(_KEYS), min_size=1)),
    st.tuples(st.just("release"), st.integers(min_value=0)),
    st.tuples(st.just("ack"), st.integers(min_value=0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_operation, max_size=120))
@example(  # redeliveries of two keys: a reader of both takes the last one released first
    [("publish", "a")] * 4
    + [("publish", "b")]
    + [("take", None)] * 5
    + [("release", 0), ("release", 0), ("release", 2), ("take", frozenset({"a", "b"}))]
)
def test_any_mix_of_readers_matches_the_ordered_model(operations: list[tuple[str, Any]]) -> None:
    """Readers of every key, of named keys, releases and acks in any mix: each take returns what
    a plain ordered list would (redeliveries first, then publish order), sizes agree, and
    nothing is lost or duplicated."""
    channel = MemoryChannel()
    backend = MemoryBackend(channel)
    model: list[tuple[int, str, int]] = []  # (seq, key, delivery count), in delivery order
    held: list[Any] = []
    published = 0

    async def run() -> None:
        nonlocal published
        for op, arg in operations:
            if op == "publish":
                await backend.publish(arg, {"n": published})
                model.append((published + 1, arg, 1))
                published += 1
            elif op == "take":
                iterator = backend.view(keys=arg).deliveries()
                expected = next(((s, k, d) for s, k, d in model if arg is None or k in arg), None)
                got = iterator.next_nowait()
                if expected is None:
                    assert got is None
                    continue
                assert got is not None
                assert (int(got.message_id or 0), got.key, got.delivery_count) == expected
                model.remove(expected)
                held.append(got)
            elif op == "release" and held:
                message = held.pop(arg % len(held))
                await backend.release(message)
                seq = int(message.message_id)
                model.insert(0, (seq, message.key, message.delivery_count + 1))
            elif op == "ack" and held:
                backend.ack_nowait(held.pop(arg % len(held)))
            assert channel.qsize() == len(model)
            for key in _KEYS:
                assert [int(m.message_id or 0) for m in channel.peek(key)] == [
                    s for s, k, _ in model if k == key
                ]
        assert len(channel.unacked()) == len(held)

    asyncio.run(run())


async def test_a_named_key_reader_leaves_no_backlog_of_taken_entries() -> None:
    """Draining one key while another key's messages wait keeps the publish-order index small
    (taken entries are compacted away) and the waiting key intact."""
    channel = MemoryChannel()
    backend = MemoryBackend(channel)
    await backend.publish("waiting", {"n": -1})
    for n in range(5000):
        await backend.publish("busy", {"n": n})
    busy = backend.view(keys=["busy"]).deliveries()
    for n in range(5000):
        message = busy.next_nowait()
        assert message is not None
        assert message.payload == {"n": n}
        backend.ack_nowait(message)
    assert len(channel._order) < 200
    everything = backend.deliveries()
    remaining = everything.next_nowait()
    assert remaining is not None
    assert remaining.payload == {"n": -1}
    assert everything.next_nowait() is None
