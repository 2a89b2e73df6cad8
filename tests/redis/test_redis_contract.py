"""RedisBackend run through the shared backend contract, against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from abe.backends.message_queue.service.redis import RedisBackend
from abe.testing import BackendContract
from tests.redis.redis_support import eventually

pytestmark = pytest.mark.broker


class TestRedisBackendContract(BackendContract):
    """The contract holds for RedisBackend (plain protocol and SettlingBackend)."""

    settling = True

    _stream: str
    _url: str

    @pytest.fixture
    def key(self, prefix: str, redis_url: str) -> str:
        """The test's stream, under its own prefix (deleted afterwards)."""
        self._stream = f"{prefix}contract"
        self._url = redis_url
        return self._stream

    @pytest.fixture
    async def backend(self, key: str) -> AsyncIterator[Any]:
        """A backend that consumes the test's stream."""
        backend = await self.make_backend()
        try:
            yield backend
        finally:
            await self.dispose_backend(backend)

    async def make_backend(self) -> RedisBackend:
        return RedisBackend(
            self._url, streams=[self._stream], group="contract", consumer="contract-consumer"
        )

    async def dispose_backend(self, backend: RedisBackend) -> None:
        await backend.aclose()

    async def wait_until_consuming(self, backend: RedisBackend) -> None:
        async def blocked() -> bool:
            clients = await backend.client.client_list()
            return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in clients)

        await eventually(blocked, timeout=self.timeout, what="a blocked XREADGROUP")
        await asyncio.sleep(0)
