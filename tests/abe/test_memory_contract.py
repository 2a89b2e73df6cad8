"""MemoryBackend run through the reusable backend contract."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from tests.abe.contract import BackendContract


class _MemoryContract(BackendContract):
    settling = True

    async def wait_until_consuming(self, backend: Any) -> None:
        async with asyncio.timeout(self.timeout):
            while not backend.channel._waiters:
                await asyncio.sleep(0)


class TestIsolatedMemoryBackendContract(_MemoryContract):
    """The contract holds for a MemoryBackend with a private queue."""

    async def make_backend(self) -> MemoryBackend:
        return MemoryBackend.isolated()


class TestSharedMemoryBackendContract(_MemoryContract):
    """The contract holds for MemoryBackend() on the shared queue (reset around each test)."""

    async def make_backend(self) -> MemoryBackend:
        return MemoryBackend()


class TestBackendContractItself:
    """The contract rejects a backend that breaks the protocol (so passing it means something)."""

    async def test_a_backend_that_reorders_fails_the_order_test(self) -> None:
        """A backend yielding messages newest first fails test_single_key_order_is_preserved."""

        class Reversing(MemoryBackend):
            async def consume(self, *, group: str | None = None) -> Any:
                items = [self.channel.pop_nowait(None) for _ in range(self.size())]
                for item in reversed(items):
                    assert item is not None
                    yield item[1].payload

        class Contract(BackendContract):
            async def make_backend(self) -> MemoryBackend:
                return Reversing(MemoryBackend.isolated().channel)

        contract = Contract()
        backend = await contract.make_backend()
        with pytest.raises(AssertionError):
            await contract.test_single_key_order_is_preserved(backend, "k")

    async def test_settling_flag_without_the_extension_fails(self) -> None:
        """settling = True on a backend that lacks ack/release fails instead of skipping."""

        class Plain:
            def __init__(self) -> None:
                self.inner = MemoryBackend.isolated()

            async def publish(self, key: str, payload: dict[str, Any]) -> None:
                await self.inner.publish(key, payload)

            def consume(self, *, group: str | None = None) -> Any:
                return self.inner.consume(group=group)

            @classmethod
            def from_env(cls) -> Plain:
                return cls()

        class Contract(BackendContract):
            settling = True

            async def make_backend(self) -> Plain:
                return Plain()

        contract = Contract()
        backend = await contract.make_backend()
        await contract.test_publish_then_consume_yields_the_payload(backend, "k")
        with pytest.raises(AssertionError, match="does not implement SettlingBackend"):
            await contract.test_released_delivery_is_delivered_again(backend, "k")

    async def test_a_backend_that_duplicates_fails_the_concurrent_publishers_test(self) -> None:
        """A backend that delivers one concurrent publish twice fails the concurrency test."""

        class Duplicating(MemoryBackend):
            async def publish(self, key: str, payload: dict[str, Any]) -> None:
                await super().publish(key, payload)
                if payload.get("n") == 3 and payload.get("p") == 1:
                    await super().publish(key, payload)

        class Contract(_MemoryContract):
            async def make_backend(self) -> MemoryBackend:
                return Duplicating(MemoryBackend.isolated().channel)

        contract = Contract()
        backend = await contract.make_backend()
        await contract.test_single_key_order_is_preserved(backend, "k")
        with pytest.raises(AssertionError):
            await contract.test_concurrent_publishers_reach_a_waiting_consumer_once_each(
                backend, "k"
            )
