"""Settings of the RabbitMQ backend: defaults, validation, reading the environment.

Kept apart from :mod:`.rabbitmq` so settings can be built and checked without importing
``aio-pika``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ._settings_common import (
    check_name,
    check_positive_int,
    check_seconds,
    env_int,
    env_text,
    redact,
)

__all__ = [
    "DEFAULT_DELAY_TIERS",
    "DEFAULT_QUEUES",
    "DEFAULT_URL",
    "QUEUE_TYPES",
    "RabbitMQSettings",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
"""Where the backend connects when neither an argument nor ``RABBITMQ_URL`` says otherwise."""

DEFAULT_QUEUES = ("events",)
"""Queues consumed when neither an argument nor ``RABBITMQ_QUEUES`` names any."""

DEFAULT_DELAY_TIERS = (1.0, 5.0, 30.0, 300.0, 1800.0)
"""Delays (seconds) of the TTL queues that hold delayed redeliveries."""

QUEUE_TYPES = ("quorum", "classic")
"""Allowed ``queue_type`` values."""

_SCHEMES = ("amqp", "amqps")


@dataclass(frozen=True, slots=True)
class RabbitMQSettings:
    """Validated settings of one :class:`.rabbitmq.RabbitMQBackend`.

    Attributes:
        url: ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS).
        queues: Queues that ``consume()`` and ``deliveries()`` read. Publishing works on any
            queue name (the queue is declared on first use).
        prefetch: Unacknowledged deliveries the broker sends ahead to this consumer
            (``basic.qos``).
        queue_type: ``quorum`` (default: replicated, and the broker counts deliveries in
            ``x-delivery-count``) or ``classic`` (delivery count only 1 or "redelivered").
        delivery_limit: Quorum queues only: deliveries after which the broker itself
            dead-letters a message to :attr:`dead_letter_exchange` (``None``: no limit; the
            consumer's policy decides). Keep it above the policy's attempt limit.
        dead_letter_exchange: Direct exchange dead letters are published to; each dead-letter
            queue (``<queue>.dlq`` by default) is bound to it under its own name.
        delay_tiers: Delays, in seconds, of the TTL queues ``<queue>.delay.<ms>`` that hold
            delayed redeliveries; a requested delay is rounded up to the next tier (the
            longest tier when it is longer than all of them).
        command_timeout: Seconds a publish confirm or a declaration may take.
        reconnect_interval: Seconds between reconnection attempts after a lost connection.
    """

    url: str = DEFAULT_URL
    queues: tuple[str, ...] = DEFAULT_QUEUES
    prefetch: int = 200
    queue_type: str = "quorum"
    delivery_limit: int | None = None
    dead_letter_exchange: str = "abe.dlx"
    delay_tiers: tuple[float, ...] = DEFAULT_DELAY_TIERS
    command_timeout: float = 10.0
    reconnect_interval: float = 1.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.url, str) or urlsplit(self.url).scheme not in _SCHEMES:
            raise ValueError(
                f"url must be an amqp:// or amqps:// URL, got {redact(str(self.url))!r}"
            )
        queues: object = self.queues
        if isinstance(queues, str):
            raise TypeError("queues must be an iterable of queue names, not a single string")
        names = tuple(dict.fromkeys(check_name(q, "each queue name") for q in queues))  # type: ignore[attr-defined]
        if not names:
            raise ValueError("queues must name at least one queue")
        set_(self, "queues", names)
        check_positive_int(self.prefetch, "prefetch")
        if self.queue_type not in QUEUE_TYPES:
            raise ValueError(
                f"queue_type must be one of {', '.join(QUEUE_TYPES)}, got {self.queue_type!r}"
            )
        if self.delivery_limit is not None:
            check_positive_int(self.delivery_limit, "delivery_limit")
            if self.queue_type != "quorum":
                raise ValueError("delivery_limit needs queue_type='quorum'")
        set_(
            self,
            "dead_letter_exchange",
            check_name(self.dead_letter_exchange, "dead_letter_exchange"),
        )
        tiers: object = self.delay_tiers
        if isinstance(tiers, str) or not hasattr(tiers, "__iter__"):
            raise TypeError("delay_tiers must be an iterable of seconds")
        values = sorted({check_seconds(t, "each delay tier") for t in tiers})
        if not values:
            raise ValueError("delay_tiers must hold at least one delay")
        set_(self, "delay_tiers", tuple(values))
        set_(self, "command_timeout", check_seconds(self.command_timeout, "command_timeout"))
        set_(
            self, "reconnect_interval", check_seconds(self.reconnect_interval, "reconnect_interval")
        )

    def tier_for(self, delay: float) -> float:
        """The delay tier ``delay`` seconds is rounded up to (the longest tier at most)."""
        for tier in self.delay_tiers:
            if tier >= delay:
                return tier
        return self.delay_tiers[-1]

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> RabbitMQSettings:
        """Read settings from ``RABBITMQ_*`` environment variables (``os.environ`` by default).

        ``RABBITMQ_URL``, ``RABBITMQ_QUEUES`` (comma-separated), ``RABBITMQ_PREFETCH``,
        ``RABBITMQ_QUEUE_TYPE`` (``quorum`` or ``classic``), ``RABBITMQ_DELIVERY_LIMIT``,
        ``RABBITMQ_DEAD_LETTER_EXCHANGE`` and ``RABBITMQ_DELAY_TIERS`` (comma-separated
        seconds). Unset or empty means the default.

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

        url = env_text(env, "RABBITMQ_URL")
        if url is not None:
            if urlsplit(url).scheme not in _SCHEMES:
                raise ValueError(
                    f"RABBITMQ_URL={redact(url)!r} is not valid: expected "
                    "amqp://user:password@host:port/vhost (amqps:// for TLS)"
                )
            values["url"] = url
        queues = env_text(env, "RABBITMQ_QUEUES")
        if queues is not None:
            names = [q.strip() for q in queues.split(",")]
            if not all(names):
                raise ValueError(
                    f"RABBITMQ_QUEUES={queues!r} is not valid: expected comma-separated queue "
                    "names, for example 'orders,payments'"
                )
            values["queues"] = tuple(names)
        prefetch = env_text(env, "RABBITMQ_PREFETCH")
        if prefetch is not None:
            values["prefetch"] = env_int(
                "RABBITMQ_PREFETCH", prefetch, 1, "an integer >= 1 (unacked deliveries)"
            )
        queue_type = env_text(env, "RABBITMQ_QUEUE_TYPE")
        if queue_type is not None:
            if queue_type not in QUEUE_TYPES:
                raise ValueError(
                    f"RABBITMQ_QUEUE_TYPE={queue_type!r} is not valid: expected one of "
                    f"{', '.join(QUEUE_TYPES)}"
                )
            values["queue_type"] = queue_type
        limit = env_text(env, "RABBITMQ_DELIVERY_LIMIT")
        if limit is not None:
            values["delivery_limit"] = env_int(
                "RABBITMQ_DELIVERY_LIMIT", limit, 1, "an integer >= 1 (deliveries)"
            )
        exchange = env_text(env, "RABBITMQ_DEAD_LETTER_EXCHANGE")
        if exchange is not None:
            values["dead_letter_exchange"] = exchange
        tiers = env_text(env, "RABBITMQ_DELAY_TIERS")
        if tiers is not None:
            try:
                parsed = tuple(float(t) for t in tiers.split(","))
            except ValueError:
                parsed = ()
            if not parsed or not all(0 < t < 1e7 for t in parsed):
                raise ValueError(
                    f"RABBITMQ_DELAY_TIERS={tiers!r} is not valid: expected comma-separated "
                    "seconds > 0, for example '1,5,30,300'"
                )
            values["delay_tiers"] = parsed
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
