"""A reusable contract test suite for message-queue backends.

Import it with ``from abe.testing import BackendContract``. The module depends only on
pytest, pytest-asyncio (``asyncio_mode = "auto"``) and :mod:`abe`; it is imported only by test
suites, never by the library itself.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar, TypeVar

import pytest

from abe.backends.message_queue.base import InboundMessage, SettlingBackend
from abe.types import MessageQueueBackendProtocol, MessageQueueMessage, MessageQueuePayload

__all__ = ["BackendContract"]

T = TypeVar("T")


@asynccontextmanager
async def _closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close ``iterator`` on exit when it can be closed (async generators can)."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


class BackendContract(abc.ABC):
    """Tests that prove a backend honours :class:`~abe.types.MessageQueueBackendProtocol`.

    The class is not collected on its own (its name does not start with ``Test``). To run it
    against a backend, subclass it under a ``Test*`` name and implement :meth:`make_backend`::

        from abe.testing import BackendContract
        from abe_kafka import KafkaBackend


        class TestKafkaBackendContract(BackendContract):
            settling = True  # KafkaBackend implements SettlingBackend: check ack/release too

            async def make_backend(self) -> KafkaBackend:
                return KafkaBackend(url="kafka://localhost:9092", topic_prefix="contract-")

            async def dispose_backend(self, backend: KafkaBackend) -> None:
                await backend.close()

    Every test gets a fresh backend from :meth:`make_backend` and a fresh unique ``key``, so a
    backend on a real broker should consume only what it publishes during the test (for example by
    scoping it to a per-test namespace). Optional hooks:

    * :attr:`settling`: set to ``True`` when the backend implements
      :class:`~abe.backends.message_queue.base.SettlingBackend`; the ack/release tests then run
      (otherwise they are skipped, with a reason).
    * :meth:`dispose_backend`: close connections after each test.
    * :meth:`payload_of`: turn what ``consume()`` yields into the published payload when the
      backend adds metadata around it (the default expects the payload itself).
    * :meth:`wait_until_consuming`: return once a consumer is blocked waiting for messages (the
      default only yields to the event loop a few times).
    * :attr:`timeout`: the bound, in seconds, on every wait (a failure instead of a hang).
    """

    settling: ClassVar[bool] = False
    """Whether the backend implements SettlingBackend (ack/release tests run only then)."""

    timeout: ClassVar[float] = 5.0
    """Seconds any single wait may take before the test fails."""

    # -- hooks ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def make_backend(self) -> MessageQueueBackendProtocol:
        """Return a new backend instance to test, ready to publish and consume."""

    async def dispose_backend(self, backend: Any) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`make_backend` acquired (no-op by default)."""

    def payload_of(self, message: MessageQueueMessage) -> MessageQueuePayload:
        """Return the published payload from one item yielded by ``consume()``."""
        return message

    async def wait_until_consuming(self, backend: Any) -> None:
        """Return once a started consumer of ``backend`` is waiting for messages."""
        for _ in range(10):
            await asyncio.sleep(0)

    # -- fixtures and helpers --------------------------------------------------------------------

    @pytest.fixture
    async def backend(self) -> AsyncIterator[Any]:
        """A fresh backend from make_backend(), disposed of after the test."""
        backend = await self.make_backend()
        try:
            yield backend
        finally:
            await self.dispose_backend(backend)

    @pytest.fixture
    def key(self) -> str:
        """A routing key no other test uses."""
        return f"abe-contract-{uuid.uuid4().hex}"

    async def _take(self, iterator: AsyncIterator[T], count: int = 1) -> list[T]:
        async with asyncio.timeout(self.timeout):
            return [await anext(iterator) for _ in range(count)]

    async def _read(self, backend: Any, count: int = 1, **kwargs: Any) -> list[Any]:
        async with _closing(backend.consume(**kwargs)) as stream:
            return [self.payload_of(m) for m in await self._take(stream, count)]

    def _settling(self, backend: Any) -> SettlingBackend:
        if not self.settling:
            pytest.skip(f"{type(self).__name__}.settling is False: ack/release not checked")
        assert isinstance(backend, SettlingBackend), (
            f"settling = True but {type(backend).__name__} does not implement SettlingBackend"
        )
        return backend

    # -- the plain protocol ----------------------------------------------------------------------

    async def test_is_a_message_queue_backend(self, backend: Any) -> None:
        """The backend passes the runtime MessageQueueBackendProtocol check."""
        assert isinstance(backend, MessageQueueBackendProtocol)

    async def test_from_env_is_a_classmethod(self, backend: Any) -> None:
        """The backend class has a from_env() classmethod, which load_backend() calls."""
        from_env = inspect.getattr_static(type(backend), "from_env", None)
        assert isinstance(from_env, classmethod)

    async def test_consume_returns_an_async_iterator(self, backend: Any) -> None:
        """consume() returns an async iterator without blocking."""
        async with _closing(backend.consume()) as stream:
            assert isinstance(stream, AsyncIterator)

    async def test_publish_then_consume_yields_the_payload(self, backend: Any, key: str) -> None:
        """A published payload is what the next consume() yields."""
        payload = {"id": key, "amount": 12.5, "items": ["a", "b"], "meta": {"ok": True}}
        await backend.publish(key, payload)
        assert await self._read(backend) == [payload]

    async def test_consume_accepts_a_group(self, backend: Any, key: str) -> None:
        """consume(group=...) is accepted and delivers published payloads."""
        await backend.publish(key, {"n": 1})
        assert await self._read(backend, group=f"group-{key}") == [{"n": 1}]

    async def test_single_key_order_is_preserved(self, backend: Any, key: str) -> None:
        """Payloads published under one key are consumed in publish order."""
        for n in range(20):
            await backend.publish(key, {"n": n})
        assert await self._read(backend, 20) == [{"n": n} for n in range(20)]

    async def test_consume_respects_cancellation(self, backend: Any, key: str) -> None:
        """A waiting consumer ends with CancelledError and takes no later message with it."""
        reader = asyncio.create_task(self._read(backend))
        await self.wait_until_consuming(backend)
        assert not reader.done(), "consume() yielded or ended on an empty queue"

        reader.cancel()
        async with asyncio.timeout(self.timeout):
            with pytest.raises(asyncio.CancelledError):
                await reader
        assert reader.cancelled()

        await backend.publish(key, {"after": "cancel"})
        assert await self._read(backend) == [{"after": "cancel"}]

    async def test_concurrent_publishers_reach_a_waiting_consumer_once_each(
        self, backend: Any, key: str
    ) -> None:
        """Payloads from concurrent publishers reach a waiting consumer once each, in order."""
        publishers, per_publisher = 4, 25
        reader = asyncio.create_task(self._read(backend, publishers * per_publisher))
        await self.wait_until_consuming(backend)

        async def publish(p: int) -> None:
            for n in range(per_publisher):
                await backend.publish(key, {"p": p, "n": n})

        async with asyncio.timeout(self.timeout):
            await asyncio.gather(*(publish(p) for p in range(publishers)))
            received = await reader
        expected = [{"p": p, "n": n} for p in range(publishers) for n in range(per_publisher)]
        assert sorted(received, key=lambda m: (m["p"], m["n"])) == expected
        for p in range(publishers):
            assert [m["n"] for m in received if m["p"] == p] == list(range(per_publisher))

    # -- the SettlingBackend extension ---------------------------------------------------------

    async def test_deliveries_carry_payload_key_and_first_delivery_count(
        self, backend: Any, key: str
    ) -> None:
        """A first delivery has the payload, the key, an id and delivery_count 1."""
        settling = self._settling(backend)
        await backend.publish(key, {"n": 1})
        async with _closing(settling.deliveries()) as stream:
            (message,) = await self._take(stream)
            await settling.ack(message)
        assert isinstance(message, InboundMessage)
        assert (message.payload, message.key, message.delivery_count) == ({"n": 1}, key, 1)
        assert message.message_id is not None

    async def test_acked_delivery_is_not_delivered_again(self, backend: Any, key: str) -> None:
        """After ack() the next delivery is the next message, not the acknowledged one."""
        settling = self._settling(backend)
        await backend.publish(key, {"n": 1})
        await backend.publish(key, {"n": 2})
        async with _closing(settling.deliveries()) as stream:
            (first,) = await self._take(stream)
            await settling.ack(first)
            (second,) = await self._take(stream)
            await settling.ack(second)
        assert (first.payload, second.payload) == ({"n": 1}, {"n": 2})
        assert second.message_id != first.message_id

    async def test_released_delivery_is_delivered_again(self, backend: Any, key: str) -> None:
        """After release() the same message comes back with a higher delivery_count."""
        settling = self._settling(backend)
        await backend.publish(key, {"n": 1})
        async with _closing(settling.deliveries()) as stream:
            (first,) = await self._take(stream)
            await settling.release(first)
            (again,) = await self._take(stream)
            await settling.ack(again)
        assert again.payload == {"n": 1}
        assert again.message_id == first.message_id
        assert again.delivery_count > first.delivery_count

    async def test_next_nowait_hands_out_what_anext_would(self, backend: Any, key: str) -> None:
        """When the deliveries iterator offers ``next_nowait()``, it takes the same messages in
        the same order as ``__anext__``, settled alike, and returns ``None`` once none is
        ready."""
        settling = self._settling(backend)
        for n in range(3):
            await backend.publish(key, {"n": n})
        async with _closing(settling.deliveries()) as stream:
            take = getattr(stream, "next_nowait", None)
            if take is None:
                pytest.skip("the deliveries iterator offers no next_nowait()")
            (first,) = await self._take(stream)  # waits until the backend has the messages
            taken: list[InboundMessage] = []
            while len(taken) < 2:  # a backend may have none ready yet: then __anext__ waits
                message = take()
                if message is None:
                    (message,) = await self._take(stream)
                assert isinstance(message, InboundMessage)
                taken.append(message)
            assert take() is None
            await settling.release(taken[0])
            (again,) = await self._take(stream)
            for message in (first, taken[1], again):
                await settling.ack(message)
            assert take() is None
        assert [m.payload["n"] for m in (first, *taken)] == [0, 1, 2]
        assert (again.message_id, again.payload) == (taken[0].message_id, {"n": 1})
        assert again.delivery_count > taken[0].delivery_count
