"""Helpers shared by the Redis backend tests: polling, a private redis-server, worker processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import redis

from abe.backends.message_queue.service.redis import RedisBackend

WORKER = Path(__file__).with_name("redis_worker.py")

MakeBackend = Callable[..., RedisBackend]
"""The ``make_backend`` fixture: keyword arguments of :class:`RedisBackend`, test defaults."""

StreamEntry = tuple[bytes, dict[bytes, bytes]]
"""One stream entry as a client without ``decode_responses`` returns it: id and fields."""


def stream_entries(reply: object) -> list[StreamEntry]:
    """An XRANGE / XREVRANGE reply of a client without ``decode_responses``, typed as such.

    redis-py annotates these replies with one union for every client configuration (decoded
    or not, sync or async), so the shape a test's client really returns is stated here once.
    """
    return cast(list[StreamEntry], reply)


def read_reply(reply: object) -> list[tuple[bytes, list[StreamEntry]]]:
    """An XREAD / XREADGROUP reply (RESP2, no ``decode_responses``): per stream, its entries.

    redis-py annotates it as ``Any | int | str`` for every client configuration.
    """
    return cast(list[tuple[bytes, list[StreamEntry]]], reply)


def list_values(reply: object) -> list[bytes]:
    """An LRANGE reply of a client without ``decode_responses``, typed as such."""
    return cast(list[bytes], reply)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` (every 10 ms) until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A test-owned redis-server with append-only persistence, on its own port."""

    def __init__(self, directory: Path, *args: str, password: str | None = None) -> None:
        self.directory = directory
        self.args = args
        """Extra redis-server arguments."""
        self.password = password
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart) the server and wait until it answers."""
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
                *(("--requirepass", self.password) if self.password is not None else ()),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save; the AOF is fsynced on every write)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def start_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Run tests/redis/_worker.py with this interpreter; its stdout is a line protocol."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
