"""Fixtures for the NATS JetStream backend tests, against a real NATS server.

The tests use the server at ``NATS_TEST_URL`` (default ``nats://127.0.0.1:4222``). When it does
not answer they are skipped with the reason, except under ``CI=true``, where a missing server
fails them. Every test works on a stream, subjects and durable consumer of its own and deletes
them afterwards; a test that restarts a server starts a private one (``nats_server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest

from abe.backends.message_queue.service.nats import NATSBackend
from tests.nats.nats_support import Names, NATSServer

NATS_URL = os.environ.get("NATS_TEST_URL", "nats://127.0.0.1:4222")


def ci() -> bool:
    """Whether the tests run under CI=true (missing brokers fail instead of skipping)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


async def _probe(url: str) -> None:
    parts = urlsplit(url)
    # nats-py keeps retrying a refused first connection: try the port plainly first.
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222), 3
    )
    writer.close()
    async with asyncio.timeout(10):
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The URL of a NATS server with JetStream that answers; skips (fails under CI=true)."""
    try:
        asyncio.run(_probe(NATS_URL))
    except Exception as exc:
        reason = f"NATS JetStream at {NATS_URL} does not answer ({type(exc).__name__}: {exc})"
        if ci():
            pytest.fail(f"{reason}; CI=true, so broker tests must run, not skip")
        pytest.skip(f"{reason}; set NATS_TEST_URL or start nats-server -js to run them")
    return NATS_URL


@pytest.fixture
async def names(nats_url: str) -> AsyncIterator[Names]:
    """Fresh names; the test's streams (and their consumers) are deleted afterwards."""
    made = Names()
    try:
        yield made
    finally:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for stream in (made.stream, made.dead_letter_stream):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(stream)
        finally:
            await nc.close()


@pytest.fixture
async def make_backend(nats_url: str, names: Names) -> AsyncIterator[Any]:
    """Build NATSBackends on the test's stream (subject ``<prefix>.s``); closes them."""
    made: list[NATSBackend] = []

    def make(**kwargs: Any) -> NATSBackend:
        kwargs.setdefault("stream", names.stream)
        kwargs.setdefault("subjects", [names.subject()])
        kwargs.setdefault("dead_letter_stream", names.dead_letter_stream)
        kwargs.setdefault("block", 0.5)
        backend = NATSBackend(kwargs.pop("url", nats_url), **kwargs)
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.aclose()


@pytest.fixture
def nats_server(tmp_path: Path, nats_url: str) -> Iterator[NATSServer]:
    """A private ``nats-server -js`` on a free port, storing in the test's directory."""
    server = NATSServer(tmp_path / "js")
    if server.binary is None:
        reason = "nats-server is not installed"
        if ci():
            pytest.fail(f"{reason}; CI=true, so broker tests must run, not skip")
        pytest.skip(reason)
    server.start()
    try:
        yield server
    finally:
        server.stop()
