"""Settings of the NATS JetStream backend: defaults, validation, reading the environment.

Kept apart from :mod:`.nats` so settings can be built and checked without importing ``nats-py``.
"""

from __future__ import annotations

import os
import re
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

__all__ = ["DEFAULT_DURABLE", "DEFAULT_STREAM", "DEFAULT_SUBJECTS", "DEFAULT_URL", "NATSSettings"]

DEFAULT_URL = "nats://localhost:4222"
"""Where the backend connects when neither an argument nor ``NATS_URL`` says otherwise."""

DEFAULT_STREAM = "ABE"
"""The JetStream stream used when neither an argument nor ``NATS_STREAM`` names one."""

DEFAULT_SUBJECTS = ("events",)
"""Subjects the stream captures when neither an argument nor ``NATS_SUBJECTS`` names any."""

DEFAULT_DURABLE = "abe"
"""Durable consumer used when ``consume()`` / ``deliveries()`` get ``group=None``."""

_SCHEMES = ("nats", "tls", "ws", "wss")
_STREAM_NAME = re.compile(r"^[^.*>\s/\\]+$")


def _stream_name(value: str, name: str) -> str:
    value = check_name(value, name)
    if not _STREAM_NAME.match(value):
        raise ValueError(
            f"{name} must be a JetStream name without '.', '*', '>', '/', '\\' or spaces, "
            f"got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class NATSSettings:
    """Validated settings of one :class:`.nats.NATSBackend`.

    Attributes:
        url: ``nats://host:port`` (comma-separated for a cluster; ``tls://`` for TLS).
        stream: The JetStream stream holding the work; created on first use when missing.
        subjects: Subjects the stream captures when the backend creates it.
        durable: Durable pull consumer used when a caller passes ``group=None``.
        batch_size: Messages per pull request.
        block: Seconds one pull request waits for messages.
        ack_wait: Seconds the server waits for an acknowledgement before redelivering; the
            backend keeps the messages it holds alive with ``in_progress()`` well before that.
        max_deliver: Deliveries after which the server stops delivering a message (``None``:
            no limit). Keep it above the policy's attempt limit so the policy dead-letters
            first.
        dead_letter_stream: The stream dead letters (``<subject>.dlq``) are stored in; created
            on first dead letter, each destination subject added when first used.
        command_timeout: Seconds a publish acknowledgement or a stream call may take.
    """

    url: str = DEFAULT_URL
    stream: str = DEFAULT_STREAM
    subjects: tuple[str, ...] = DEFAULT_SUBJECTS
    durable: str = DEFAULT_DURABLE
    batch_size: int = 100
    block: float = 2.0
    ack_wait: float = 30.0
    max_deliver: int | None = None
    dead_letter_stream: str = ""
    command_timeout: float = 10.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        urls = str(self.url).split(",")
        if not isinstance(self.url, str) or not all(
            urlsplit(u.strip()).scheme in _SCHEMES for u in urls
        ):
            raise ValueError(f"url must be a nats:// or tls:// URL, got {redact(str(self.url))!r}")
        set_(self, "stream", _stream_name(self.stream, "stream"))
        subjects: object = self.subjects
        if isinstance(subjects, str):
            raise TypeError("subjects must be an iterable of subjects, not a single string")
        names = tuple(dict.fromkeys(check_name(s, "each subject") for s in subjects))  # type: ignore[attr-defined]
        if not names:
            raise ValueError("subjects must name at least one subject")
        set_(self, "subjects", names)
        set_(self, "durable", _stream_name(self.durable, "durable"))
        check_positive_int(self.batch_size, "batch_size")
        set_(self, "block", check_seconds(self.block, "block"))
        set_(self, "ack_wait", check_seconds(self.ack_wait, "ack_wait"))
        if self.max_deliver is not None:
            check_positive_int(self.max_deliver, "max_deliver")
        set_(
            self,
            "dead_letter_stream",
            _stream_name(self.dead_letter_stream or f"{self.stream}_DLQ", "dead_letter_stream"),
        )
        if self.dead_letter_stream == self.stream:
            raise ValueError("dead_letter_stream must differ from stream")
        set_(self, "command_timeout", check_seconds(self.command_timeout, "command_timeout"))

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> NATSSettings:
        """Read settings from ``NATS_*`` environment variables (``os.environ`` by default).

        ``NATS_URL``, ``NATS_STREAM``, ``NATS_SUBJECTS`` (comma-separated), ``NATS_DURABLE``,
        ``NATS_BATCH_SIZE``, ``NATS_ACK_WAIT`` (seconds), ``NATS_MAX_DELIVER`` and
        ``NATS_DEAD_LETTER_STREAM``. Unset or empty means the default.

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

        url = env_text(env, "NATS_URL")
        if url is not None:
            if not all(urlsplit(u.strip()).scheme in _SCHEMES for u in url.split(",")):
                raise ValueError(
                    f"NATS_URL={redact(url)!r} is not valid: expected nats://host:port "
                    "(comma-separated for a cluster, tls:// for TLS)"
                )
            values["url"] = url
        for name, attr in (
            ("NATS_STREAM", "stream"),
            ("NATS_DURABLE", "durable"),
            ("NATS_DEAD_LETTER_STREAM", "dead_letter_stream"),
        ):
            value = env_text(env, name)
            if value is not None:
                if not _STREAM_NAME.match(value):
                    raise ValueError(
                        f"{name}={value!r} is not valid: expected a name without '.', '*', "
                        "'>', '/', '\\' or spaces"
                    )
                values[attr] = value
        subjects = env_text(env, "NATS_SUBJECTS")
        if subjects is not None:
            names = [s.strip() for s in subjects.split(",")]
            if not all(names):
                raise ValueError(
                    f"NATS_SUBJECTS={subjects!r} is not valid: expected comma-separated "
                    "subjects, for example 'orders.*,payments'"
                )
            values["subjects"] = tuple(names)
        for name, attr, allowed in (
            ("NATS_BATCH_SIZE", "batch_size", "an integer >= 1 (messages per pull)"),
            ("NATS_MAX_DELIVER", "max_deliver", "an integer >= 1 (deliveries)"),
            ("NATS_ACK_WAIT", "ack_wait", "an integer >= 1 (seconds)"),
        ):
            value = env_text(env, name)
            if value is not None:
                values[attr] = env_int(name, value, 1, allowed)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
