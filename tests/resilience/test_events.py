"""The event records: MessageSettled is stored as a tuple and keeps a frozen dataclass's API."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from resilience.events import (
    AttemptFailed,
    Event,
    EventBus,
    MessageSettled,
    Outcome,
    RetryScheduled,
    new_record,
)

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
