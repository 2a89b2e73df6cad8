"""Conformance with the published Abstract Backend package's observable behaviour.

Each test states one thing an application written against the published ``abstract-backend``
sees: the consumer's lifecycle and log lines, the loader's warnings and errors, the backend
protocol's placeholder body and the in-memory backend's ``_queue``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import warnings
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any

import pytest

from abe.backends.message_queue import loader
from abe.backends.message_queue.base import MessageQueueBackend
from abe.backends.message_queue.consumer import AsyncLoopConsumer
from abe.backends.message_queue.service.memory import MemoryBackend
from abe.types import MessageQueueBackendProtocol
from tests.consume_stream import closable

LOGGER = "abe.backends.message_queue.consumer"

# A bound on waits that should finish at once, so a regression fails instead of hanging.
GUARD = 5.0


class CountingBackend:
    """A backend that counts consume() calls; its iterator yields ``payloads`` then ends, or
    waits for more when ``endless``."""

    def __init__(self, payloads: Iterable[dict[str, Any]] = (), *, endless: bool = False) -> None:
        self.payloads = list(payloads)
        self.endless = endless
        self.consume_calls = 0
        self.consuming = asyncio.Event()

    async def publish(self, key: str, payload: dict[str, Any]) -> None:
        self.payloads.append(payload)

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        self.consume_calls += 1
        self.consuming.set()
        for payload in list(self.payloads):
            yield payload
        if self.endless:
            await asyncio.Event().wait()

    @classmethod
    def from_env(cls) -> CountingBackend:
        return cls()


class FailingOnCancelBackend(CountingBackend):
    """A backend whose iterator turns its cancellation into ``exc``."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(endless=True)
        self.exc = exc

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        self.consume_calls += 1
        self.consuming.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise self.exc from None
        yield {}  # pragma: no cover - makes this an async generator


async def _noop(payload: dict[str, Any]) -> None:
    pass


async def _start(consumer: AsyncLoopConsumer, backend: CountingBackend) -> asyncio.Task[None]:
    runner = asyncio.create_task(consumer.run(_noop))
    async with asyncio.timeout(GUARD):
        await backend.consuming.wait()
    return runner


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


# -- AsyncLoopConsumer.run() -------------------------------------------------------------------


async def test_run_while_running_returns_at_once_without_consuming_again() -> None:
    """A second run() while the consumer task is active returns at once; consume() ran once."""
    backend = CountingBackend(endless=True)
    consumer = AsyncLoopConsumer(backend)
    runner = await _start(consumer, backend)

    async with asyncio.timeout(GUARD):
        await consumer.run(_noop)

    assert backend.consume_calls == 1
    assert not runner.done()
    await consumer.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_run_after_the_iterator_ended_returns_at_once_until_shutdown() -> None:
    """Once run() has consumed everything the consumer still counts as running: run() again
    returns at once without a second consume() call, as in the published runtime."""
    seen: list[dict[str, Any]] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload)

    backend = CountingBackend([{"n": 1}])
    consumer = AsyncLoopConsumer(backend)
    await consumer.run(handler)
    await consumer.run(handler)

    assert backend.consume_calls == 1
    assert seen == [{"n": 1}]
    assert consumer._running is True


async def test_run_after_shutdown_consumes_again() -> None:
    """After shutdown() a new run() calls consume() again."""
    backend = CountingBackend([{"n": 1}])
    consumer = AsyncLoopConsumer(backend)
    await consumer.run(_noop)
    await consumer.shutdown()
    await consumer.run(_noop)
    assert backend.consume_calls == 2


async def test_handler_error_is_logged_with_the_published_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler exception is an ERROR "Error processing message: <error>" with its traceback."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def handler(payload: dict[str, Any]) -> None:
        raise ValueError(f"bad payload {payload['n']}")

    await AsyncLoopConsumer(CountingBackend([{"n": 1}])).run(handler)

    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (record.levelno, record.getMessage()) == (
        logging.ERROR,
        "Error processing message: bad payload 1",
    )
    assert record.exc_info is not None
    assert record.exc_info[0] is ValueError


# -- AsyncLoopConsumer.shutdown() --------------------------------------------------------------


async def test_shutdown_of_a_running_consumer_logs_the_published_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopping an active consumer logs exactly the published DEBUG lines, in order."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    backend = CountingBackend(endless=True)
    consumer = AsyncLoopConsumer(backend)
    runner = await _start(consumer, backend)

    await consumer.shutdown()

    assert _lines(caplog) == [
        (logging.DEBUG, "Shutting down AsyncLoopConsumer"),
        (logging.DEBUG, "Cancelling consumer task"),
        (logging.DEBUG, "Consumer task cancelled successfully"),
        (logging.DEBUG, "Consumer shutdown complete"),
    ]
    assert consumer._task is None
    assert consumer._running is False
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_shutdown_after_the_task_ended_logs_already_completed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """shutdown() after the consumer task ended logs "Consumer task was already completed"."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    consumer = AsyncLoopConsumer(CountingBackend([{"n": 1}]))
    await consumer.run(_noop)

    await consumer.shutdown()

    assert _lines(caplog) == [
        (logging.DEBUG, "Shutting down AsyncLoopConsumer"),
        (logging.DEBUG, "Consumer task was already completed"),
        (logging.DEBUG, "Consumer shutdown complete"),
    ]
    assert consumer._task is None
    assert consumer._running is False


async def test_shutdown_after_the_run_caller_was_cancelled_logs_already_completed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the task awaiting run() was cancelled, shutdown() finds the task already ended."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    backend = CountingBackend(endless=True)
    consumer = AsyncLoopConsumer(backend)
    runner = await _start(consumer, backend)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner

    await consumer.shutdown()

    assert (logging.DEBUG, "Consumer task was already completed") in _lines(caplog)
    assert consumer._task is None
    assert consumer._running is False


async def test_shutdown_when_not_running_logs_the_published_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """shutdown() before run() logs one DEBUG "Shutdown called on consumer that is not running"."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    consumer = AsyncLoopConsumer(CountingBackend())
    await consumer.shutdown()
    await consumer.shutdown()
    assert (
        _lines(caplog) == [(logging.DEBUG, "Shutdown called on consumer that is not running")] * 2
    )


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (RuntimeError("socket closed"), "Unexpected error during consumer shutdown: socket closed"),
        (TimeoutError("close timed out"), "Timeout during consumer shutdown: close timed out"),
    ],
    ids=["unexpected", "timeout"],
)
async def test_error_while_cancelling_logs_the_published_warning(
    caplog: pytest.LogCaptureFixture, exc: Exception, line: str
) -> None:
    """An error the task raises while being cancelled is the published WARNING, not raised."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    backend = FailingOnCancelBackend(exc)
    consumer = AsyncLoopConsumer(backend)
    runner = await _start(consumer, backend)

    await consumer.shutdown()

    assert _lines(caplog) == [
        (logging.DEBUG, "Shutting down AsyncLoopConsumer"),
        (logging.DEBUG, "Cancelling consumer task"),
        (logging.WARNING, line),
        (logging.DEBUG, "Consumer shutdown complete"),
    ]
    with pytest.raises(type(exc)):
        await runner


# -- load_backend() ----------------------------------------------------------------------------


class _EntryPoint:
    """The part of an entry point the loader reads, like the published tests' stand-ins."""

    def __init__(self, name: str, target: Any) -> None:
        self.name = name
        self.target = target
        self.value = f"tests:{name}"
        self.loads = 0

    def load(self) -> Any:
        self.loads += 1
        return self.target


class _Warnings:
    """Records warnings.warn calls made through the loader module's ``warnings`` name."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def warn(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((*args, *sorted(kwargs.items())))


def _register(monkeypatch: pytest.MonkeyPatch, *eps: _EntryPoint) -> None:
    monkeypatch.setattr(loader, "entry_points", lambda *, group: list(eps))


def _loader_warnings(monkeypatch: pytest.MonkeyPatch) -> _Warnings:
    recorder = _Warnings()
    monkeypatch.setattr(loader, "warnings", recorder)
    return recorder


async def test_nothing_registered_warns_the_published_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no provider registered, load_backend() calls warnings.warn(<published text>,
    UserWarning) and returns a MemoryBackend."""
    _register(monkeypatch)
    recorder = _loader_warnings(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MemoryBackend.from_env()'s own warning
        backend = load()
    assert recorder.calls == [
        (
            "No message-queue backends registered. Using MemoryBackend (development only).",
            UserWarning,
        )
    ]
    assert isinstance(backend, MemoryBackend)


async def test_only_a_memory_provider_registered_warns_the_published_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With only a "memory" provider registered, load_backend() warns the published fallback
    text and creates MemoryBackend itself, without loading the entry point."""
    memory = _EntryPoint("memory", MemoryBackend)
    _register(monkeypatch, memory)
    recorder = _loader_warnings(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backend = load()
    assert recorder.calls == [
        ("No external backend found — using MemoryBackend (dev only).", UserWarning)
    ]
    assert isinstance(backend, MemoryBackend)
    assert memory.loads == 0


async def test_the_fallback_warning_is_a_real_user_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unpatched, the loader's fallback warning is a UserWarning with the published text."""
    _register(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load()
    texts = [(w.category, str(w.message)) for w in caught]
    assert (
        UserWarning,
        "No message-queue backends registered. Using MemoryBackend (development only).",
    ) in texts


async def test_unknown_backend_error_keeps_the_published_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unknown QUEUE_BACKEND raises RuntimeError whose text starts with the published
    "❌ Unknown backend" line and install hints; only a line of installed providers follows."""
    _register(monkeypatch, _EntryPoint("memory", MemoryBackend))
    monkeypatch.setenv("QUEUE_BACKEND", "kafka")
    with pytest.raises(RuntimeError) as excinfo:
        load()
    published = (
        "❌ Unknown backend 'kafka'. \n"
        "💡 Try one of the following installation methods: \n"
        "🔹 by pip:    pip install abe-kafka\n"
        "🔹 by poetry: poetry add abe-kafka\n"
        "🔹 by uv:     uv add abe-kafka"
    )
    message = str(excinfo.value)
    assert message.startswith(published + "\n")
    assert message[len(published) + 1 :].count("\n") == 0
    assert "memory" in message[len(published) :]


async def test_a_named_provider_is_loaded_and_created_from_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QUEUE_BACKEND=<name> loads that entry point once and returns its from_env() instance."""
    kafka = _EntryPoint("kafka", CountingBackend)
    _register(monkeypatch, _EntryPoint("memory", MemoryBackend), kafka)
    monkeypatch.setenv("QUEUE_BACKEND", "kafka")
    assert isinstance(load(), CountingBackend)
    assert kafka.loads == 1


def load() -> MessageQueueBackend:
    """Call the loader (a helper so every test reads the same)."""
    return loader.load_backend()


# -- MessageQueueBackend protocol ----------------------------------------------------------------


async def test_consume_protocol_body_is_a_yield_placeholder() -> None:
    """MessageQueueBackend.consume is an async generator whose placeholder body yields {}."""

    class Inheriting(MessageQueueBackendProtocol):
        async def publish(self, key: str, payload: dict[str, Any]) -> None:
            pass

        @classmethod
        def from_env(cls) -> Inheriting:
            return cls()

    assert MessageQueueBackend is MessageQueueBackendProtocol
    assert inspect.isasyncgenfunction(MessageQueueBackend.consume)
    async with aclosing(closable(Inheriting().consume())) as messages:
        assert [message async for message in messages] == [{}]


# -- MemoryBackend ---------------------------------------------------------------------------------


async def test_memory_from_env_warns_development_testing_only() -> None:
    """MemoryBackend.from_env() warns a UserWarning containing "development/testing only"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MemoryBackend.from_env()
    assert [w.category for w in caught] == [UserWarning]
    assert "development/testing only" in str(caught[0].message)


async def test_memory_queue_is_shared_by_instances() -> None:
    """Every MemoryBackend() sees the same class-level _queue."""
    assert MemoryBackend()._queue is MemoryBackend()._queue


async def test_memory_queue_size_counts_published_not_consumed_messages() -> None:
    """_queue.qsize() is the number of published messages not yet consumed."""
    backend = MemoryBackend()
    assert backend._queue.qsize() == 0
    for n in range(3):
        await backend.publish(f"key-{n}", {"n": n})
    assert backend._queue.qsize() == 3
    async with aclosing(closable(backend.consume())) as messages:
        async with asyncio.timeout(GUARD):
            assert await anext(messages) == {"n": 0}
    assert backend._queue.qsize() == 2


async def test_memory_consume_calls_task_done_once_per_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """consume() calls _queue.task_done() once for every message it hands out, so join()
    returns once everything published was consumed."""
    backend = MemoryBackend()
    done = 0
    task_done = backend._queue.task_done

    def counting_task_done() -> None:
        nonlocal done
        done += 1
        task_done()

    monkeypatch.setattr(backend._queue, "task_done", counting_task_done)
    for n in range(3):
        await backend.publish("orders", {"n": n})
    async with aclosing(closable(backend.consume())) as messages, asyncio.timeout(GUARD):
        for n in range(3):
            assert await anext(messages) == {"n": n}
            assert done == n + 1
        await backend._queue.join()


async def test_memory_queue_can_be_replaced_like_the_published_tests_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Assigning a fresh asyncio.Queue to MemoryBackend._queue gives every instance that queue."""
    monkeypatch.setattr(MemoryBackend, "_queue", asyncio.Queue())
    backend = MemoryBackend()
    await backend.publish("orders", {"n": 1})
    assert MemoryBackend._queue.qsize() == 1
    async with aclosing(closable(backend.consume())) as messages, asyncio.timeout(GUARD):
        assert await anext(messages) == {"n": 1}
    assert MemoryBackend._queue.qsize() == 0
