"""RabbitMQBackend run through the shared backend contract, against a real RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from abe.backends.message_queue.service.rabbitmq import RabbitMQBackend
from abe.testing import BackendContract
from tests.rabbitmq.rabbitmq_support import Queues

pytestmark = pytest.mark.broker


class TestRabbitMQBackendContract(BackendContract):
    """The contract holds for RabbitMQBackend (plain protocol and SettlingBackend)."""

    settling = True

    _queue: str
    _url: str
    _exchange: str

    @pytest.fixture
    def key(self, queues: Queues, rabbitmq_url: str) -> str:
        """The test's queue (deleted afterwards)."""
        self._queue = queues("contract")
        self._exchange = queues.exchange
        self._url = rabbitmq_url
        return self._queue

    @pytest.fixture
    async def backend(self, key: str) -> AsyncIterator[Any]:
        """A backend that consumes the test's queue."""
        backend = await self.make_backend()
        try:
            yield backend
        finally:
            await self.dispose_backend(backend)

    async def make_backend(self) -> RabbitMQBackend:
        return RabbitMQBackend(self._url, queues=[self._queue], dead_letter_exchange=self._exchange)

    async def dispose_backend(self, backend: RabbitMQBackend) -> None:
        await backend.aclose()

    async def wait_until_consuming(self, backend: RabbitMQBackend) -> None:
        async with asyncio.timeout(self.timeout):
            while await backend.consumer_count(self._queue) < 1:
                await asyncio.sleep(0.01)
