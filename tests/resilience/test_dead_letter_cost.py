"""What a dead letter does not repeat: source lookups, JSON encoding, unheard log records."""

from __future__ import annotations

import json
import linecache
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resilience._log import get_logger
from resilience.clock import FakeClock
from resilience.dead_letter import DeadLetterRouter, EnvelopeBuilder, SQLiteStore
from resilience.dead_letter import sqlite as sqlite_module
from resilience.dead_letter._limits import bounded_traceback, dumps
from resilience.dead_letter.sqlite import encoded_writer
from resilience.delivery import Delivery
from resilience.events import Outcome
from resilience.pipeline import Pipeline


def _failure() -> ValueError:
    try:
        raise ValueError("bad order")
    except ValueError as exc:
        return exc


def test_a_location_source_line_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second traceback through the same lines is the same text without a file lookup."""
    first, _ = bounded_traceback(_failure(), 30, 16 * 1024)
    assert 'raise ValueError("bad order")' in first

    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError("source looked up again")

    monkeypatch.setattr(linecache, "getline", refuse)
    monkeypatch.setattr(linecache, "checkcache", refuse)
    again, _ = bounded_traceback(_failure(), 30, 16 * 1024)
    assert again == first


def test_builder_hands_out_the_text_of_its_last_envelope_only() -> None:
    """encoded() is the JSON of the envelope built last, and None for any other one."""
    builder = EnvelopeBuilder()

    def build(n: int) -> dict[str, Any]:
        return builder.build(
            Delivery({"n": n}, key="orders", message_id=str(n)),
            _failure(),
            reason="rejected",
            stage="handle",
            monotonic_now=0.0,
        )

    one = build(1)
    assert builder.encoded(one) == dumps(one)
    two = build(2)
    assert builder.encoded(one) is None
    assert builder.encoded(dict(two)) is None  # an equal copy is not the same envelope
    two["payload"] = {"n": 3}
    refitted = builder.refit(two)
    text = builder.encoded(refitted)
    assert text is not None
    assert json.loads(text)["payload"] == {"n": 3}


async def test_router_stores_the_builder_text_without_encoding_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the router, the SQLite store writes the text the size check made; the stored
    envelope is the one built."""
    store = SQLiteStore(tmp_path / "dl.sqlite3")
    router = DeadLetterRouter(store, clock=FakeClock())

    def refuse(value: object) -> str:
        raise AssertionError("envelope encoded a second time")

    monkeypatch.setattr(sqlite_module, "dumps", refuse)

    async def handler(payload: dict[str, Any]) -> None:
        raise ValueError("bad order")

    delivery = Delivery({"n": 1}, key="orders", message_id="7")
    await Pipeline(router).build(handler)(delivery)
    assert delivery.outcome is Outcome.DEAD_LETTERED
    (record,) = await store.find()
    assert record.envelope["payload"] == {"n": 1}
    assert record.envelope["error"]["message"] == "bad order"
    with pytest.raises(AssertionError, match="second time"):
        await store.write(record.envelope)  # a plain write encodes


async def test_a_replaced_write_is_always_called(tmp_path: Path) -> None:
    """A store whose write is replaced (or overridden) gets every envelope through it."""
    store = SQLiteStore(tmp_path / "dl.sqlite3")
    assert encoded_writer(store) is not None
    seen: list[dict[str, Any]] = []

    async def write(envelope: Any, delivery: Any = None) -> None:
        seen.append(envelope)

    store.write = write  # type: ignore[method-assign]
    assert encoded_writer(store) is None

    class Audited(SQLiteStore):
        async def write(self, envelope: Any, delivery: Any = None) -> None:
            seen.append(envelope)

    assert encoded_writer(Audited(tmp_path / "other.sqlite3")) is None
    router = DeadLetterRouter(store, clock=FakeClock())

    async def handler(payload: dict[str, Any]) -> None:
        raise ValueError("bad order")

    await Pipeline(router).build(handler)(Delivery({}, key="orders", message_id="8"))
    assert len(seen) == 1


@pytest.fixture
def lonely_logger() -> Iterator[logging.Logger]:
    """A library logger with only a NullHandler (the default), restored afterwards."""
    logger = logging.getLogger("resilience.test_cost_lonely")
    logger.propagate = False
    logger.handlers = [logging.NullHandler()]
    logger.setLevel(logging.DEBUG)
    yield logger
    logger.handlers = []
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def test_no_record_is_made_when_only_null_handlers_listen(
    lonely_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event no handler would emit makes no LogRecord; a real handler or a filter gets it."""
    made: list[str] = []
    make = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(self, *args, **kwargs)
        made.append(record.getMessage())
        return record

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    log = get_logger(lonely_logger.name)
    lonely_logger.handlers = [logging.NullHandler()]  # (the test run's capture handlers off)
    log.warning("unheard")
    assert made == []

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    lonely_logger.addHandler(Keep())
    log.warning("heard", n=1)
    assert [r.getMessage() for r in seen] == ["heard"]
    assert seen[0].__dict__["n"] == 1

    lonely_logger.handlers = [logging.NullHandler()]
    filtered: list[str] = []

    def look(record: logging.LogRecord) -> bool:
        filtered.append(record.getMessage())
        return True

    lonely_logger.addFilter(look)
    log.info("looked at")
    assert filtered == ["looked at"]
    lonely_logger.removeFilter(look)


def test_the_last_resort_still_prints_without_any_handler(
    lonely_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no handler at all the stdlib's last resort prints warnings, as before."""
    lonely_logger.handlers = []
    log = get_logger(lonely_logger.name)
    log.info("quiet")
    log.warning("loud")
    err = capsys.readouterr().err
    assert "loud" in err
    assert "quiet" not in err


def test_a_logger_class_that_only_finds_the_caller_differently_is_dropped_too() -> None:
    """structlog's LoggerFactory installs a Logger subclass process-wide; its unheard events
    are dropped as well, while a class that handles records its own way gets every event."""
    from resilience._log import _plain

    class FindsCaller(logging.Logger):
        def findCaller(self, stack_info: bool = False, stacklevel: int = 1) -> Any:
            return super().findCaller(stack_info, stacklevel)

    class Handles(logging.Logger):
        def handle(self, record: logging.LogRecord) -> None:
            super().handle(record)

    assert _plain(logging.Logger)
    assert _plain(FindsCaller)
    assert not _plain(Handles)
