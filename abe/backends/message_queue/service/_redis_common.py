"""Shared pieces of the Redis Streams backend: errors, counters, the client it creates."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from ._redis_settings import RedisSettings

__all__ = [
    "LOGGER_NAME",
    "REFUSED_ERRORS",
    "TRANSIENT_ERRORS",
    "RedisBackendError",
    "RedisStats",
    "RedisUnavailableError",
    "Sleep",
    "make_client",
    "socket_timeout_of",
    "text",
]

LOGGER_NAME = "abe.backends.message_queue.service.redis"
"""Every module of the backend logs under this name."""

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
)
"""Errors after which reading reconnects and resumes: lost connections, timeouts (the builtin
``TimeoutError`` of ``command_timeout`` is an ``OSError``), and ``BusyLoadingError`` (a
``ConnectionError``) while a restarted Redis loads its data."""

REFUSED_ERRORS: tuple[type[BaseException], ...] = (AuthenticationError, AuthorizationError)
"""Connection errors that waiting cannot cure (a wrong password, a user without rights): they
are raised at once as :class:`RedisBackendError`, never retried as if Redis were down, although
redis-py derives them from its ``ConnectionError``."""

Sleep = Callable[[float], Awaitable[None]]
"""How reconnection backoff waits (``asyncio.sleep``; tests pass a fake)."""


class RedisBackendError(Exception):
    """A Redis operation of :class:`RedisBackend` failed; the Redis error is the ``__cause__``."""


class RedisUnavailableError(RedisBackendError, ConnectionError):
    """Redis could not be reached or did not answer in time (a transient failure)."""


@dataclass(slots=True)
class RedisStats:
    """Running counters of one :class:`RedisBackend` (all readers together).

    Attributes:
        published: Entries written by ``publish*``.
        delivered: Entries handed out (new and reclaimed).
        reclaimed: Entries taken over from idle consumers (crashed, stalled, or released).
        acked: Entries acknowledged.
        ack_round_trips: XACK round trips (acks ride along with reads when they can).
        released: Entries handed back for redelivery.
        dead_lettered: Entries dead-lettered atomically.
        poison: Entries that could not be decoded (yielded with ``decode_error``).
        deleted_while_pending: Pending entries found deleted from their stream (trimmed).
        reconnects: Failed attempts to reach Redis while reading (each followed by a backoff).
    """

    published: int = 0
    delivered: int = 0
    reclaimed: int = 0
    acked: int = 0
    ack_round_trips: int = 0
    released: int = 0
    dead_lettered: int = 0
    poison: int = 0
    deleted_while_pending: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


def make_client(settings: RedisSettings) -> aioredis.Redis:
    """The backend's own client: bytes responses, keepalive, no socket timeout (see below)."""
    # No socket_timeout: redis-py then wraps every send in asyncio.wait_for, which on Python
    # 3.11 can swallow a cancellation (the consumer's shutdown would hang in a blocking read).
    # Every call is bounded by asyncio.timeout(command_timeout) instead, and TCP keepalive
    # finds dead peers.
    return aioredis.Redis.from_url(
        settings.url,
        decode_responses=False,
        socket_timeout=None,
        socket_connect_timeout=min(5.0, settings.command_timeout),
        socket_keepalive=True,
        socket_keepalive_options=_keepalive_options(),
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
    )


def socket_timeout_of(client: aioredis.Redis) -> float | None:
    """The socket timeout of ``client``'s connections, in seconds (``None``: no timeout).

    redis-py leaves it out of the pool's connection arguments when the caller did not set it
    (its connections then default to 5 s), so a connection object is built, never connected,
    to read it. Anything unexpected reads as ``None``.
    """
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    if "socket_timeout" in kwargs:
        value = kwargs["socket_timeout"]
    else:
        try:
            value = getattr(pool.connection_class(**kwargs), "socket_timeout", None)  # type: ignore[union-attr]
        except Exception:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(value)


def _keepalive_options() -> dict[int, int]:
    options: dict[int, int] = {}
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        constant = getattr(socket, name, None)
        if isinstance(constant, int):
            options[constant] = value
    return options


def text(value: Any) -> str:
    """``value`` as ``str`` (Redis replies are bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
