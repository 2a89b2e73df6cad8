"""Fixtures for the RabbitMQ backend tests, against a real RabbitMQ.

The tests use the broker at ``RABBITMQ_TEST_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``).
When it does not answer they are skipped with the reason, except under ``CI=true``, where a
missing broker fails them. Every test works on queues of its own (a unique prefix) and deletes
them afterwards; the shared broker is never restarted.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from abe.backends.message_queue.service.rabbitmq import RabbitMQBackend
from tests.rabbitmq.rabbitmq_support import Queues

RABBITMQ_URL = os.environ.get("RABBITMQ_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


async def _probe(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=3)
    await connection.close()


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The URL of a RabbitMQ that answers; skips (or fails under CI=true) when none does."""
    try:
        asyncio.run(_probe(RABBITMQ_URL))
    except Exception as exc:
        reason = f"RabbitMQ at {RABBITMQ_URL} does not answer ({type(exc).__name__}: {exc})"
        if _ci():
            pytest.fail(f"{reason}; CI=true, so broker tests must run, not skip")
        pytest.skip(f"{reason}; set RABBITMQ_TEST_URL or start rabbitmq-server to run them")
    return RABBITMQ_URL


@pytest.fixture
async def queues(rabbitmq_url: str) -> AsyncIterator[Queues]:
    """A fresh queue namer; deletes the queues (dead-letter and delay queues too) afterwards."""
    names = Queues()
    try:
        yield names
    finally:
        connection = await aio_pika.connect(rabbitmq_url)
        try:
            channel = await connection.channel()
            doomed = set(names.names)
            for name in names.names:
                doomed.add(f"{name}.dlq")
                doomed.update(f"{name}.delay.{ms}" for ms in (1, 50, 100, 200, 300, 500, 1000))
                doomed.update(f"{name}.delay.{ms}" for ms in (5000, 30000, 300000, 1800000))
            for name in doomed:
                await channel.queue_delete(name, if_unused=False, if_empty=False)
            await channel.exchange_delete(names.exchange)
        finally:
            await connection.close()


@pytest.fixture
async def make_backend(rabbitmq_url: str, queues: Queues) -> AsyncIterator[Any]:
    """Build RabbitMQBackends on the test's queues (``<prefix>.q`` by default); closes them."""
    made: list[RabbitMQBackend] = []

    def make(**kwargs: Any) -> RabbitMQBackend:
        kwargs.setdefault("queues", [queues()])
        kwargs.setdefault("dead_letter_exchange", queues.exchange)
        backend = RabbitMQBackend(kwargs.pop("url", rabbitmq_url), **kwargs)
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.aclose()
