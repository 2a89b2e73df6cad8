"""MemoryBackend readers of named keys: the one queue order, several readers, and flat cost.

A reader of several named keys (``MemoryBackend(keys=[...])``, ``view(keys=...)``) takes what a
reader of every key would take among those keys: the lowest-ranked message, redeliveries queued
at the front first. These tests hold that against a plain ordered model under every way a
message is queued (publish, release, ``release_later``, ``recover``), with readers of
overlapping key sets side by side, and count the work each take does as the keys grow.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.backends.message_queue.service import memory
from abe.backends.message_queue.service.memory import MemoryBackend, MemoryChannel


class ManualTimers:
    """Timers for ``release_later`` that fire only when the test says so, oldest first."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], object]] = []

    def call_later(self, seconds: float, callback: Callable[[], object]) -> object:
        self.pending.append(callback)
        return None

    def fire(self) -> bool:
        """Run the oldest pending timer; ``False`` when none is pending."""
        if not self.pending:
            return False
        self.pending.pop(0)()
        return True


_KEYS = ("a", "b", "c", "d")
_READERS: tuple[frozenset[str] | None, ...] = (
    None,
    frozenset({"a", "b"}),
    frozenset({"b", "c"}),
    frozenset({"a", "b", "c", "d"}),
    frozenset({"c"}),
    frozenset({"a", "c", "d"}),
)
_operation = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(_KEYS)),
    st.tuples(st.just("take"), st.integers(0, len(_READERS) - 1)),
    st.tuples(st.just("release"), st.integers(min_value=0)),
    st.tuples(st.just("release_later"), st.integers(min_value=0)),
    st.tuples(st.just("fire"), st.none()),
    st.tuples(st.just("ack"), st.integers(min_value=0)),
    st.tuples(st.just("recover"), st.none()),
)

Model = list[tuple[str, str, int]]
"""Waiting messages as (message id, key, delivery count), in the order every key is read."""


@settings(max_examples=300, deadline=None)
@given(st.lists(_operation, max_size=150))
@example(  # a redelivery of b jumps ahead for both readers of b; {a, b} then takes a's oldest
    [
        *[("publish", "a"), ("publish", "b"), ("publish", "b"), ("take", 2), ("take", 2)],
        *[("release", 1), ("take", 1), ("take", 1), ("take", 2)],
    ]
)
@example(  # recover() queues every unacked delivery at the front, oldest first
    [
        *[("publish", "c"), ("publish", "a"), ("publish", "c"), ("take", 3), ("take", 5)],
        *[("take", 4), ("recover", None), ("take", 5), ("take", 1), ("take", 2)],
    ]
)
def test_readers_of_named_keys_take_what_a_reader_of_every_key_would(
    operations: list[tuple[str, Any]],
) -> None:
    """Readers of every key and of overlapping named key sets, kept across the run, with
    publishes, releases, delayed releases, recover() and acks in any mix: each take returns the
    first message of the reader's keys in the order an every-key reader sees, sizes and peeks
    agree with that order, and nothing is lost or duplicated."""
    timers = ManualTimers()
    channel = MemoryChannel()
    backend = MemoryBackend(channel, clock=timers)
    readers = [backend.view(keys=keys).deliveries() for keys in _READERS]
    model: Model = []
    held: list[InboundMessage] = []

    async def run() -> None:
        for op, arg in operations:
            if op == "publish":
                message_id = await backend.publish_message(arg, {"n": len(model)})
                assert message_id is not None
                model.append((message_id, arg, 1))
            elif op == "take":
                keys = _READERS[arg]
                got = readers[arg].next_nowait()
                expected = next((m for m in model if keys is None or m[1] in keys), None)
                if expected is None:
                    assert got is None
                    continue
                assert got is not None
                assert (got.message_id, got.key, got.delivery_count) == expected
                model.remove(expected)
                held.append(got)
            elif op == "release" and held:
                message = held.pop(arg % len(held))
                await backend.release(message)
                model.insert(0, (message.message_id or "", message.key, message.delivery_count + 1))
            elif op == "release_later" and held:
                message = held.pop(arg % len(held))
                await backend.release_later(message, 1.0)
            elif op == "fire":
                waiting = backend.delayed()
                if timers.fire():
                    (ready,) = [m for m in waiting if m not in backend.delayed()]
                    model.append((ready.message_id or "", ready.key, ready.delivery_count))
            elif op == "ack" and held:
                backend.ack_nowait(held.pop(arg % len(held)))
            elif op == "recover":
                assert backend.recover() == len(held)
                requeued = sorted(held, key=lambda m: int(m.message_id or 0))
                model[:0] = [(m.message_id or "", m.key, m.delivery_count + 1) for m in requeued]
                held.clear()
            assert channel.qsize() == len(model)
            for key in _KEYS:
                assert backend.size(key) == sum(1 for m in model if m[1] == key)
                assert [m.message_id for m in channel.peek(key)] == [
                    i for i, k, _ in model if k == key
                ]
        assert len(backend.unacked()) == len(held)

    asyncio.run(run())


async def test_two_readers_of_overlapping_keys_share_one_order() -> None:
    """Readers of {a, b} and {b, c} each take the oldest message of their keys, never one the
    other took, and a released message of the shared key b comes back first for both."""
    backend = MemoryBackend.isolated()
    for key in ("a", "b", "c", "b", "a", "c"):
        await backend.publish(key, {"key": key})
    left = backend.view(keys=["a", "b"]).deliveries()
    right = backend.view(keys=["b", "c"]).deliveries()

    def ids(*messages: InboundMessage | None) -> list[str | None]:
        return [m.message_id if m is not None else None for m in messages]

    first, second = left.next_nowait(), right.next_nowait()
    assert ids(first, second) == ["1", "2"]
    assert second is not None
    await backend.release(second)
    assert ids(left.next_nowait()) == ["2"]  # the redelivery of b, ahead of 4 (b) and 5 (a)
    assert ids(right.next_nowait(), right.next_nowait(), left.next_nowait()) == ["3", "4", "5"]
    assert ids(left.next_nowait(), right.next_nowait(), right.next_nowait()) == [None, "6", None]
    assert backend.size() == 0
    assert len(backend.unacked()) == 6


async def test_backends_naming_the_same_keys_share_the_channels_copy_of_the_set() -> None:
    """Backends and views naming the same keys on one channel, in any order, hold one set
    object, so each read finds the set's order by identity instead of comparing 1,000 keys."""
    channel = MemoryChannel()
    names = [f"key.{k}" for k in range(1000)]
    first = MemoryBackend(channel, keys=names)
    second = MemoryBackend(channel, keys=reversed(names))
    assert first.keys is second.keys
    assert first.view(keys=set(names)).keys is first.keys
    assert MemoryBackend(MemoryChannel(), keys=names).keys is not first.keys


async def test_a_key_set_nobody_reads_any_more_stays_small() -> None:
    """A reader of {busy, idle} that read once leaves an order that the channel keeps up to
    date; while another reader drains busy's 5,000 messages, that order is compacted instead of
    holding every one of them."""
    channel = MemoryChannel()
    backend = MemoryBackend(channel)
    assert backend.view(keys=["busy", "idle"]).deliveries().next_nowait() is None
    busy = backend.view(keys=["busy"]).deliveries()
    for n in range(5000):
        await backend.publish("busy", {"n": n})
        message = busy.next_nowait()
        assert message is not None
        assert message.payload == {"n": n}
        backend.ack_nowait(message)
    assert len(channel._sets[frozenset({"busy", "idle"})]) < 200
    assert len(channel._order) < 200


# -- the work per take ------------------------------------------------------------------------


async def _lines_per_take(keys: int, messages: int) -> float:
    """Lines of the memory module run per take while a reader of ``keys`` named keys (beside an
    every-key reader and a reader of half the keys, both registered) drains ``messages``
    published round-robin, one in eight released back to the front once."""
    names = [f"key.{k}" for k in range(keys)]
    channel = MemoryChannel()
    backend = MemoryBackend(channel)
    reader = backend.view(keys=names).deliveries()
    for other in (backend.deliveries(), backend.view(keys=names[::2]).deliveries()):
        assert other.next_nowait() is None
    lines = 0

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if frame.f_code.co_filename != memory.__file__:
            return None
        if event == "line":
            lines += 1
        return trace

    for n in range(messages):
        await backend.publish(names[n % keys], {"n": n})
    taken = 0
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        while (message := reader.next_nowait()) is not None:
            taken += 1
            if message.delivery_count == 1 and int(message.message_id or 0) % 8 == 0:
                await backend.release(message)
            else:
                backend.ack_nowait(message)
    finally:
        sys.settrace(previous)
    assert taken == messages + messages // 8
    print(f"{keys} keys: {lines / taken:.2f} lines per take")
    return lines / taken


async def test_the_work_per_take_of_named_keys_does_not_grow_with_the_keys() -> None:
    """A reader of 1,000 named keys runs no more of the backend's code per message than a
    reader of 4 (a scan of the keys would run about 250 times as many lines)."""
    few, many = await _lines_per_take(4, 4000), await _lines_per_take(1000, 4000)
    assert many <= few * 1.1, (few, many)
