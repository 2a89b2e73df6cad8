"""The event records: MessageSettled is stored as a tuple and keeps a frozen dataclass's API."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.consumer import ResilientConsumer
from resilience.events import (
    AttemptFailed,
    Event,
    EventBus,
    MessageSettled,
    Outcome,
    RetryScheduled,
    new_record,
)
from resilience.policy import Policy

FIELDS = ("message_id", "key", "outcome", "attempts", "duration", "reason", "error_type")


def settled(attempts: int = 3) -> MessageSettled:
    return MessageSettled(
        message_id="7",
        key="orders",
        outcome=Outcome.FAILED,
        attempts=attempts,
        duration=0.25,
        reason="retries_exhausted",
        error_type="ValueError",
    )


def test_message_settled_is_a_dataclass_event_with_its_fields_in_order() -> None:
    record = settled()
    assert isinstance(record, Event)
    assert dataclasses.is_dataclass(record)
    assert tuple(f.name for f in dataclasses.fields(record)) == FIELDS
    assert MessageSettled.__match_args__ == FIELDS
    assert (record.message_id, record.key, record.outcome) == ("7", "orders", Outcome.FAILED)
    assert (record.attempts, record.duration) == (3, 0.25)
    assert (record.reason, record.error_type) == ("retries_exhausted", "ValueError")
    assert dataclasses.asdict(record)["outcome"] is Outcome.FAILED


def test_defaults_positional_and_keyword_construction_agree() -> None:
    positional = MessageSettled("7", None, Outcome.SUCCESS, 1, 0.5)
    assert positional.reason is None
    assert positional.error_type is None
    assert positional == MessageSettled(
        message_id="7", key=None, outcome=Outcome.SUCCESS, attempts=1, duration=0.5
    )
    with pytest.raises(TypeError):
        MessageSettled("7", None, Outcome.SUCCESS, 1)  # type: ignore[call-arg,unused-ignore]


def test_new_record_builds_the_same_record_as_the_constructor() -> None:
    record = settled()
    fields = tuple(record)
    assert fields == tuple(getattr(record, name) for name in FIELDS)
    built = new_record(MessageSettled, fields)
    assert type(built) is MessageSettled
    assert built == record
    assert hash(built) == hash(record)
    assert repr(built) == repr(record)


def test_repr_is_the_dataclass_repr() -> None:
    assert repr(MessageSettled("7", "k", Outcome.SUCCESS, 1, 0.5)) == (
        "MessageSettled(message_id='7', key='k', outcome=<Outcome.SUCCESS: 'success'>, "
        "attempts=1, duration=0.5, reason=None, error_type=None)"
    )


def test_equality_and_hash_are_by_class_and_fields() -> None:
    record = settled()
    assert record == settled()
    assert (record != settled()) is False
    assert record != settled(attempts=4)
    assert hash(record) == hash(settled())
    # Equal only to records of its own class: not to the plain tuple of the same fields.
    assert record != tuple(record)
    assert (record == tuple(record)) is False
    assert tuple(record) != record
    assert record != AttemptFailed("7", "orders", 3, "ValueError", "boom", "retryable")
    assert len({record, settled(), settled(attempts=4)}) == 2


def test_records_have_no_order() -> None:
    with pytest.raises(TypeError):
        _ = settled() < settled(attempts=4)  # type: ignore[operator,unused-ignore]
    with pytest.raises(TypeError):
        _ = settled() >= settled(attempts=4)  # type: ignore[operator,unused-ignore]


def test_record_is_immutable() -> None:
    record = settled()
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.attempts = 4  # type: ignore[misc,unused-ignore]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del record.reason  # type: ignore[misc,unused-ignore]
    with pytest.raises(AttributeError):
        record.extra = 1  # type: ignore[attr-defined,unused-ignore]
    assert not hasattr(record, "__dict__")


def test_copy_pickle_and_replace_keep_the_record() -> None:
    record = settled()
    for again in (
        copy.copy(record),
        copy.deepcopy(record),
        pickle.loads(pickle.dumps(record)),
    ):
        assert type(again) is MessageSettled
        assert again == record
    changed = dataclasses.replace(record, outcome=Outcome.DEAD_LETTERED)
    assert type(changed) is MessageSettled
    assert changed.outcome is Outcome.DEAD_LETTERED
    assert changed.attempts == 3


def test_the_other_records_keep_their_slots() -> None:
    retry = RetryScheduled("7", "orders", 1, 0.5, "ValueError")
    assert isinstance(retry, Event)
    assert type(retry).__slots__ == ("message_id", "key", "attempt", "wait", "error_type")
    assert retry == RetryScheduled("7", "orders", 1, 0.5, "ValueError")
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.wait = 1.0  # type: ignore[misc,unused-ignore]


def test_a_failing_listener_is_logged_and_the_others_still_hear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    heard: list[object] = []

    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    bus = EventBus(broken, heard.append)
    record = settled()
    bus.emit(record)
    assert heard == [record]
    assert "event listener" in caplog.text
    assert "listener bug" in caplog.text


def test_a_single_failing_listener_is_logged_and_emit_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("lone listener bug")

    bus = EventBus(broken)
    bus.emit(settled())  # does not raise
    assert "event listener" in caplog.text
    assert "lone listener bug" in caplog.text


def test_emit_follows_the_listeners_as_they_change() -> None:
    """No listener, one, several, and back: each emit reaches exactly the listeners of the
    moment, in subscription order."""
    heard: list[tuple[str, object]] = []
    bus = EventBus()
    assert not bus
    bus.emit(1)

    def first(event: object) -> None:
        heard.append(("first", event))

    def second(event: object) -> None:
        heard.append(("second", event))

    drop_first = bus.subscribe(first)
    assert bus.listeners == (first,)
    bus.emit(2)
    drop_second = bus.subscribe(second)
    bus.emit(3)
    drop_first()
    assert bus.listeners == (second,)
    bus.emit(4)
    drop_second()
    assert not bus
    bus.emit(5)
    assert heard == [("first", 2), ("first", 3), ("second", 3), ("second", 4)]


def test_a_listener_may_unsubscribe_itself_while_it_hears() -> None:
    """It hears the event being emitted, and no later one; the other listeners go on."""
    bus = EventBus()
    heard: list[object] = []
    others: list[object] = []

    def once(event: object) -> None:
        heard.append(event)
        unsubscribe()

    unsubscribe = bus.subscribe(once)
    bus.emit(1)
    bus.emit(2)
    assert heard == [1]
    unsubscribe = bus.subscribe(once)
    bus.subscribe(others.append)
    bus.emit(3)
    bus.emit(4)
    assert heard == [1, 3]
    assert others == [3, 4]


def test_copies_of_a_bus_deliver_to_its_listeners_on_their_own() -> None:
    bus = EventBus(_collect)
    _COLLECTED.clear()
    for other in (copy.copy(bus), pickle.loads(pickle.dumps(bus))):
        assert other.listeners == (_collect,)
        other.emit("copied")
        other.subscribe(print)
        assert bus.listeners == (_collect,)
    bus.emit("original")
    assert _COLLECTED == ["copied", "copied", "original"]


_COLLECTED: list[object] = []


def _collect(event: object) -> None:
    _COLLECTED.append(event)


async def _run_until(consumer: ResilientConsumer, handler: Any, done: Callable[[], bool]) -> None:
    task = asyncio.create_task(consumer.run(handler))
    for _ in range(1000):
        if done():
            break
        await asyncio.sleep(0)
    await consumer.shutdown()
    await task


async def test_a_running_consumer_reports_to_the_listeners_of_the_moment() -> None:
    """Listeners subscribed and unsubscribed by the handler while the consumer runs: each
    settlement reaches the listeners subscribed when it is reported (one, then two, then one)."""
    backend = MemoryBackend.isolated()
    order = {await backend.publish_message("jobs", {"i": i}): i for i in range(4)}
    consumer = ResilientConsumer(backend, policy=Policy())
    first: list[int] = []
    second: list[int] = []

    def hear_first(event: object) -> None:
        if isinstance(event, MessageSettled):
            first.append(order[event.message_id])

    def hear_second(event: object) -> None:
        if isinstance(event, MessageSettled):
            second.append(order[event.message_id])

    drop_first = consumer.events.subscribe(hear_first)

    async def handler(payload: dict[str, Any]) -> None:
        if payload["i"] == 1:
            consumer.events.subscribe(hear_second)
        elif payload["i"] == 2:
            drop_first()

    await _run_until(consumer, handler, lambda: len(second) == 3)
    assert first == [0, 1]
    assert second == [1, 2, 3]
    assert backend.unacked() == []


async def test_a_failing_lone_listener_does_not_stop_the_consumer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryBackend.isolated()
    for i in range(3):
        await backend.publish("jobs", {"i": i})
    consumer = ResilientConsumer(backend, policy=Policy())
    handled: list[int] = []
    calls: list[object] = []

    def broken(event: object) -> None:
        calls.append(event)
        raise RuntimeError("listener bug")

    consumer.events.subscribe(broken)

    async def handler(payload: dict[str, Any]) -> None:
        handled.append(payload["i"])

    await _run_until(consumer, handler, lambda: len(calls) == 3)
    assert handled == [0, 1, 2]
    assert [type(event) for event in calls] == [MessageSettled] * 3
    assert backend.unacked() == []
    failures = [r for r in caplog.records if r.getMessage().startswith("event listener")]
    assert len(failures) == 3
