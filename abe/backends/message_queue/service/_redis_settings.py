"""Settings of the Redis Streams backend: defaults, validation, reading the environment.

Kept apart from :mod:`.redis` so that settings can be built and checked without importing
``redis`` (and so both modules stay small).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

from ._settings_common import (
    check_name,
    check_positive_int,
    check_seconds,
    env_int,
    env_text,
    redact,
)

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_STREAMS",
    "DEFAULT_URL",
    "RedisSettings",
    "default_consumer",
    "is_pattern",
    "redact",
]

DEFAULT_URL = "redis://localhost:6379/0"
"""Where the backend connects when neither an argument nor ``REDIS_URL`` says otherwise."""

DEFAULT_STREAMS = ("events",)
"""Stream keys consumed when neither an argument nor ``REDIS_STREAMS`` names any."""

DEFAULT_GROUP = "abe"
"""Consumer group used when ``consume()`` / ``deliveries()`` get ``group=None``."""

_SCHEMES = ("redis", "rediss", "unix")


def default_consumer() -> str:
    """This process's consumer name within a group: ``<hostname>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def is_pattern(key: str) -> bool:
    """Whether stream ``key`` is a glob pattern (an unescaped ``*``, ``?`` or ``[``), read as
    every stream whose name matches it (Redis ``SCAN MATCH`` syntax)."""
    escaped = False
    for char in key:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "*?[":
            return True
    return False


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Validated settings of one :class:`~abe.backends.message_queue.service.redis.RedisBackend`.

    Durations are float seconds (or ``timedelta``) and normalised to float seconds.

    Attributes:
        url: ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL; may carry a password.
        streams: Stream keys that ``consume()`` and ``deliveries()`` read. A key with an
            unescaped ``*``, ``?`` or ``[`` is a pattern (``tenant:*``): every stream whose name
            matches it, looked up with ``SCAN`` at start and every ``discover_interval``, so
            streams created later are read without a restart.
        group: Consumer group used when a caller passes ``group=None``.
        consumer: This consumer's name in the group (unique per process).
        batch_size: Entries fetched per XREADGROUP (``COUNT``) and per reclaim round.
        block: Seconds one XREADGROUP waits for new entries before looping.
        claim_idle: Seconds an entry may stay unacknowledged with no sign of life from its
            consumer before a live consumer reclaims it (XAUTOCLAIM). Live consumers refresh
            the entries they hold, so this only has to exceed how long a stalled or dead
            process should be waited for.
        maxlen: Approximate cap on a stream's length applied when publishing (``None``: never
            trim; trimming can delete entries nobody has processed yet).
        ack_batch: Acknowledgements buffered before one multi-id XACK is sent at once (0, the
            default, means twice ``batch_size`` or the size of the last read across all
            streams, whichever is larger; see :attr:`ack_limit`).
        ack_delay: Seconds a buffered acknowledgement may wait for the next read before it is
            flushed on its own.
        reconnect_initial: First wait, in seconds, after a lost connection.
        reconnect_max: Longest wait between reconnection attempts.
        command_timeout: Seconds one Redis command may take before it counts as a lost
            connection (a blocking read may take ``block`` longer).
        discover_interval: Seconds between two look-ups of the streams matching the patterns
            in ``streams`` (unused without patterns). Each look-up is a ``SCAN`` of the key
            space, so do not make it very short on a Redis with millions of keys.
    """

    url: str = DEFAULT_URL
    streams: tuple[str, ...] = DEFAULT_STREAMS
    group: str = DEFAULT_GROUP
    consumer: str = field(default_factory=default_consumer)
    batch_size: int = 100
    block: float = 2.0
    claim_idle: float = 60.0
    maxlen: int | None = None
    ack_batch: int = 0
    ack_delay: float = 0.1
    reconnect_initial: float = 0.1
    reconnect_max: float = 5.0
    command_timeout: float = 10.0
    discover_interval: float = 10.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.url, str) or urlsplit(self.url).scheme not in _SCHEMES:
            raise ValueError(
                f"url must be a redis://, rediss:// or unix:// URL, got {redact(str(self.url))!r}"
            )
        streams: object = self.streams
        if isinstance(streams, str):
            raise TypeError("streams must be an iterable of stream keys, not a single string")
        names = tuple(dict.fromkeys(check_name(s, "each stream key") for s in streams))  # type: ignore[attr-defined]
        if not names:
            raise ValueError("streams must name at least one stream key")
        set_(self, "streams", names)
        set_(self, "group", check_name(self.group, "group"))
        set_(self, "consumer", check_name(self.consumer, "consumer"))
        check_positive_int(self.batch_size, "batch_size")
        set_(self, "block", check_seconds(self.block, "block", allow_zero=True))
        set_(self, "claim_idle", check_seconds(self.claim_idle, "claim_idle"))
        if self.maxlen is not None:
            check_positive_int(self.maxlen, "maxlen")
        if self.ack_batch != 0:
            check_positive_int(self.ack_batch, "ack_batch (0 = twice batch_size)")
        set_(self, "ack_delay", check_seconds(self.ack_delay, "ack_delay", allow_zero=True))
        set_(self, "reconnect_initial", check_seconds(self.reconnect_initial, "reconnect_initial"))
        set_(self, "reconnect_max", check_seconds(self.reconnect_max, "reconnect_max"))
        set_(self, "command_timeout", check_seconds(self.command_timeout, "command_timeout"))
        set_(self, "discover_interval", check_seconds(self.discover_interval, "discover_interval"))
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError(
                f"reconnect_max ({self.reconnect_max:g}s) must be >= reconnect_initial "
                f"({self.reconnect_initial:g}s)"
            )

    @property
    def claim_idle_ms(self) -> int:
        """:attr:`claim_idle` in whole milliseconds, as Redis takes it."""
        return max(1, round(self.claim_idle * 1000))

    @property
    def ack_limit(self) -> int:
        """Acknowledgements buffered before they are sent at once."""
        return self.ack_batch or 2 * self.batch_size

    @property
    def block_ms(self) -> int:
        """:attr:`block` in whole milliseconds, as Redis takes it."""
        return round(self.block * 1000)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> RedisSettings:
        """Read settings from environment variables (``os.environ`` by default).

        ``REDIS_URL``, ``REDIS_STREAMS`` (comma-separated), ``REDIS_GROUP``, ``REDIS_CONSUMER``,
        ``REDIS_BATCH_SIZE``, ``REDIS_BLOCK_MS``, ``REDIS_CLAIM_IDLE_MS``, ``REDIS_MAXLEN``,
        ``REDIS_DISCOVER_INTERVAL_MS`` and ``REDIS_PASSWORD`` (used when the URL carries none).
        Unset or empty means the default. ``REDIS_STREAMS`` may hold patterns
        (``REDIS_STREAMS=tenant:*``).

        Args:
            environ: The variables to read.
            **overrides: Settings that win over the environment.

        Returns:
            The validated settings.

        Raises:
            ValueError: a variable is invalid; the message names it, its value and what is
                allowed.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}

        url = env_text(env, "REDIS_URL")
        password = env.get("REDIS_PASSWORD") or None  # a secret: taken as it is, not stripped
        if url is not None or password is not None:
            url = url or DEFAULT_URL
            parts = urlsplit(url)
            if parts.scheme not in _SCHEMES:
                raise ValueError(
                    f"REDIS_URL={redact(url)!r} is not a Redis URL: use "
                    "redis://[:password@]host[:port][/db], rediss://... for TLS, or unix://path"
                )
            if password is not None and parts.password is None and parts.scheme != "unix":
                user = parts.username or ""
                secret = quote(password, safe="")  # redis-py unquotes it; '@' or '/' stay
                netloc = f"{user}:{secret}@{parts.netloc.rpartition('@')[2]}"
                url = urlunsplit(parts._replace(netloc=netloc))
            values["url"] = url
        streams = env_text(env, "REDIS_STREAMS")
        if streams is not None:
            keys = [s.strip() for s in streams.split(",")]
            if not all(keys):
                raise ValueError(
                    f"REDIS_STREAMS={streams!r} has an empty stream key: give comma-separated "
                    "stream keys, for example 'orders,payments'"
                )
            values["streams"] = tuple(keys)
        for name, attr in (("REDIS_GROUP", "group"), ("REDIS_CONSUMER", "consumer")):
            value = env_text(env, name)
            if value is not None:
                values[attr] = value
        integers = (
            ("REDIS_BATCH_SIZE", "batch_size", 1, "an integer >= 1 (entries per read)"),
            ("REDIS_MAXLEN", "maxlen", 1, "an integer >= 1 (approximate entries kept)"),
        )
        for name, attr, minimum, allowed in integers:
            value = env_text(env, name)
            if value is not None:
                values[attr] = env_int(name, value, minimum, allowed)
        millis = (
            ("REDIS_BLOCK_MS", "block", 0, "an integer >= 0 (milliseconds)"),
            ("REDIS_CLAIM_IDLE_MS", "claim_idle", 1, "an integer >= 1 (milliseconds)"),
            (
                "REDIS_DISCOVER_INTERVAL_MS",
                "discover_interval",
                1,
                "an integer >= 1 (milliseconds between look-ups of streams matching a pattern)",
            ),
        )
        for name, attr, minimum, allowed in millis:
            value = env_text(env, name)
            if value is not None:
                values[attr] = env_int(name, value, minimum, allowed) / 1000
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
