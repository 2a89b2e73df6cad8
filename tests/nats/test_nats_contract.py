"""NATSBackend run through the shared backend contract, against a real NATS JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from abe.backends.message_queue.service.nats import NATSBackend
from abe.testing import BackendContract
from tests.nats.nats_support import Names

pytestmark = pytest.mark.broker


class TestNATSBackendContract(BackendContract):
    """The contract holds for NATSBackend (plain protocol and SettlingBackend)."""

    settling = True

    _names: Names
    _url: str

    @pytest.fixture
    def key(self, names: Names, nats_url: str) -> str:
        """The test's subject, in a stream of its own (deleted afterwards)."""
        self._names = names
        self._url = nats_url
        return names.subject()

    @pytest.fixture
    async def backend(self, key: str) -> AsyncIterator[Any]:
        """A backend whose stream captures the test's subject."""
        backend = await self.make_backend()
        try:
            yield backend
        finally:
            await self.dispose_backend(backend)

    async def make_backend(self) -> NATSBackend:
        n = self._names
        return NATSBackend(
            self._url,
            stream=n.stream,
            subjects=[n.subject()],
            dead_letter_stream=n.dead_letter_stream,
            block=0.5,
        )

    async def dispose_backend(self, backend: NATSBackend) -> None:
        await backend.aclose()

    async def wait_until_consuming(self, backend: NATSBackend) -> None:
        async def consuming() -> bool:
            js = await backend.jetstream()
            try:
                info = await js.consumer_info(self._names.stream, backend.settings.durable)
            except Exception:
                return False
            return (info.num_waiting or 0) > 0

        async with asyncio.timeout(self.timeout):
            while not await consuming():
                await asyncio.sleep(0.01)
