"""Fixtures for the Redis Streams backend tests, against a real Redis.

The tests use the Redis at ``REDIS_TEST_URL`` (default ``redis://127.0.0.1:6379/0``). When it
does not answer they are skipped with the reason, except under ``CI=true``, where a missing
Redis fails them: CI starts one, so its absence is a broken build, not a reason to skip.
Every test works under its own key prefix and deletes what it created.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from abe.backends.message_queue.service._redis_delay import DELAY_INDEX_KEY
from abe.backends.message_queue.service.redis import RedisBackend
from tests.redis.redis_support import MakeBackend, RedisServer

REDIS_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/0")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a Redis that answers; skips (or fails under CI=true) when none does."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        reason = f"Redis at {REDIS_URL} does not answer ({type(exc).__name__}: {exc})"
        if _ci():
            pytest.fail(f"{reason}; CI=true, so broker tests must run, not skip")
        pytest.skip(f"{reason}; set REDIS_TEST_URL or start redis-server to run broker tests")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py asyncio client for setting up and inspecting streams."""
    c = aioredis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
async def prefix(client: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix no other test uses; every key under it is deleted afterwards."""
    p = f"abe-test:{uuid.uuid4().hex[:12]}:"
    try:
        yield p
    finally:
        keys = [k async for k in client.scan_iter(match=f"{p}*", count=1000)]
        if keys:
            await client.delete(*keys)
        members = await client.zrange(DELAY_INDEX_KEY, 0, -1)
        indexed = [m for m in members if isinstance(m, bytes) and m.startswith(p.encode())]
        if indexed:
            await client.zrem(DELAY_INDEX_KEY, *indexed)


@pytest.fixture
async def make_backend(redis_url: str, prefix: str) -> AsyncIterator[MakeBackend]:
    """Build RedisBackends on the test's prefix (stream ``<prefix>s`` by default); closes them."""
    made: list[RedisBackend] = []

    def make(**kwargs: Any) -> RedisBackend:
        kwargs.setdefault("streams", [f"{prefix}s"])
        kwargs.setdefault("group", "g")
        kwargs.setdefault("consumer", f"c{len(made)}")
        backend = RedisBackend(kwargs.pop("url", redis_url), **kwargs)
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.aclose()


@pytest.fixture
def redis_server(tmp_path: Path, redis_url: str) -> Iterator[RedisServer]:
    """A private redis-server (append-only, fsync always) on a free port; killed afterwards."""
    if shutil.which("redis-server") is None:
        if _ci():
            pytest.fail("redis-server is not on PATH; CI=true, so the restart test must run")
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
