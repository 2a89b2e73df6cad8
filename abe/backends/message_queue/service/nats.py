"""NATS JetStream backend on nats-py: durable pull consumers, explicit acks, broker-held delays.

Many consumer processes share one durable consumer of one stream::

    backend = NATSBackend("nats://localhost:4222", stream="ORDERS", subjects=["orders"])
    await backend.publish("orders", {"id": 7})
    async for message in backend.deliveries():      # at-least-once: ack when done
        ...
        await backend.ack(message)

Guarantees (see ``docs/nats.md``):

* Publishing waits for the stream's acknowledgement; each message carries a ``Nats-Msg-Id``
  so a publish retried within the stream's duplicate window is stored once.
* Every message is acknowledged explicitly, only when the consumer settles it; one not
  acknowledged within ``ack_wait`` (a crashed consumer) is delivered again, and
  ``num_delivered`` is the delivery count. Messages a live consumer holds are kept alive with
  ``in_progress()``.
* Dead-lettering publishes the record to ``<subject>.dlq`` in the dead-letter stream, waits
  for its acknowledgement, then terminates the original (``term()``): a crash in between makes
  a duplicate at worst, and the record's id as ``Nats-Msg-Id`` lets the stream drop it.
* Delayed redelivery is ``nak(delay=...)``: the server holds the message, the consumer's slot
  is free.
* The client reconnects by itself after a lost connection or a server restart; fetching
  resumes by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any, NoReturn

try:
    import nats
    from nats.aio.client import Client
    from nats.js.api import (
        DEFAULT_PREFIX,
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        StreamConfig,
    )
    from nats.js.client import JetStreamContext
    from nats.js.errors import NoStreamResponseError, NotFoundError
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "The NATS backend needs nats-py: install it with `pip install 'abe-resilience[nats]'`"
    ) from exc

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.types import ConsumerGroup, MessageQueueKey, MessageQueueMessage, MessageQueuePayload

from ._nats_reader import LOGGER_NAME, NATSDeliveries, PullReader
from ._nats_settings import (
    DEFAULT_DURABLE,
    DEFAULT_STREAM,
    DEFAULT_SUBJECTS,
    DEFAULT_URL,
    NATSSettings,
)
from ._settings_common import redact

__all__ = [
    "DEFAULT_DURABLE",
    "DEFAULT_STREAM",
    "DEFAULT_SUBJECTS",
    "DEFAULT_URL",
    "NATSBackend",
    "NATSBackendError",
    "NATSSettings",
    "NATSUnavailableError",
]

logger = logging.getLogger(LOGGER_NAME)

_dumps = json.JSONEncoder(separators=(",", ":")).encode

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
"""Errors of a server that cannot be reached or did not answer in time."""


class NATSBackendError(Exception):
    """A NATS operation failed; the nats-py error is the ``__cause__``."""


class NATSUnavailableError(NATSBackendError, ConnectionError):
    """NATS could not be reached or did not acknowledge in time (a transient failure)."""


class NATSBackend:
    """Message-queue backend on NATS JetStream (nats-py), at least once.

    Implements the plain ``publish`` / ``consume`` protocol and the extensions
    :class:`~abe.backends.message_queue.base.SettlingBackend`,
    :class:`~abe.backends.message_queue.base.DeadLetteringBackend`,
    :class:`~abe.backends.message_queue.base.HeaderPublishingBackend` and
    :class:`~abe.backends.message_queue.base.DelayingBackend`.

    A key is a subject; the stream must capture it (the backend creates the stream with
    ``subjects`` when it does not exist). A consumer group is a durable pull consumer.

    Args:
        url: ``nats://host:port`` (default ``nats://localhost:4222``).
        stream: The work stream (default ``"ABE"``).
        subjects: Subjects the stream captures when the backend creates it (default
            ``("events",)``).
        durable: Durable consumer for ``group=None`` (default ``"abe"``).
        batch_size: Messages per pull request (default 100).
        ack_wait: Seconds before an unacknowledged message is redelivered (default 30).
        max_deliver: Server-side delivery limit (default: none).
        dead_letter_stream: Stream of the dead letters (default ``<stream>_DLQ``).
        settings: Ready :class:`NATSSettings`; the other arguments override its fields.

    Raises:
        ValueError: an invalid setting (the message names it and what is allowed).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        stream: str | None = None,
        subjects: Iterable[str] | None = None,
        durable: str | None = None,
        batch_size: int | None = None,
        block: float | timedelta | None = None,
        ack_wait: float | timedelta | None = None,
        max_deliver: int | None = None,
        dead_letter_stream: str | None = None,
        settings: NATSSettings | None = None,
    ) -> None:
        if isinstance(subjects, str):
            raise TypeError("subjects must be an iterable of subjects, not a single string")
        overrides: dict[str, Any] = {
            name: value
            for name, value in (
                ("url", url),
                ("stream", stream),
                ("subjects", None if subjects is None else tuple(subjects)),
                ("durable", durable),
                ("batch_size", batch_size),
                ("block", _secs(block)),
                ("ack_wait", _secs(ack_wait)),
                ("max_deliver", max_deliver),
                ("dead_letter_stream", dead_letter_stream),
            )
            if value is not None
        }
        self._settings = (
            replace(settings, **overrides) if settings is not None else NATSSettings(**overrides)
        )
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting = asyncio.Lock()
        self._stream_ready = False
        self._dead_letter_subjects: set[str] = set()
        self._readers: list[PullReader] = []
        """Open readers (closed ones are dropped)."""
        self._settling: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_env(cls) -> NATSBackend:
        """Create a backend from ``NATS_*`` environment variables.

        ``NATS_URL``, ``NATS_STREAM``, ``NATS_SUBJECTS`` (comma-separated), ``NATS_DURABLE``,
        ``NATS_BATCH_SIZE``, ``NATS_ACK_WAIT`` (seconds), ``NATS_MAX_DELIVER`` and
        ``NATS_DEAD_LETTER_STREAM``.

        Returns:
            The backend (it connects on first use).

        Raises:
            ValueError: a variable is invalid; the message names it, its value and what is
                allowed.
        """
        return cls(settings=NATSSettings.from_environ())

    @property
    def settings(self) -> NATSSettings:
        """The validated settings."""
        return self._settings

    # -- connection and topology -----------------------------------------------------------------

    async def jetstream(self) -> JetStreamContext:
        """The JetStream context, connecting on first use.

        Raises:
            NATSUnavailableError: the server could not be reached.
        """
        js = self._js
        if js is not None:
            return js
        if self._closed:
            raise RuntimeError("the NATS backend is closed")
        async with self._connecting:
            if self._js is None:
                try:
                    nc = await nats.connect(
                        self._settings.url,
                        name="abe-resilience",
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,
                        connect_timeout=min(5.0, self._settings.command_timeout),
                        allow_reconnect=True,
                        error_cb=_log_error,
                    )
                except Exception as exc:
                    self._fail("connecting", exc)
                self._nc = nc
                self._js = nc.jetstream(timeout=self._settings.command_timeout)
        assert self._js is not None
        return self._js

    async def _ensure_stream(self) -> JetStreamContext:
        js = await self.jetstream()
        if not self._stream_ready:
            s = self._settings
            try:
                await js.stream_info(s.stream)
            except NotFoundError:
                await js.add_stream(StreamConfig(name=s.stream, subjects=list(s.subjects)))
            self._stream_ready = True
        return js

    def consumer_config(self, durable: str) -> ConsumerConfig:
        """The durable pull consumer's configuration (explicit acks, ``ack_wait``,
        ``max_deliver``, from the first message of the stream)."""
        s = self._settings
        return ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=s.ack_wait,
            max_deliver=s.max_deliver if s.max_deliver is not None else -1,
            max_ack_pending=max(1000, 10 * s.batch_size),
        )

    async def _subscribe(self, durable: str) -> tuple[Client, str]:
        """Make sure the stream and durable consumer ``durable`` exist; returns the connection
        and the subject its pull requests go to."""
        js = await self._ensure_stream()
        s = self._settings
        try:
            await js.consumer_info(s.stream, durable)
        except NotFoundError:
            await js.add_consumer(s.stream, self.consumer_config(durable))
        assert self._nc is not None
        return self._nc, f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{s.stream}.{durable}"

    async def _ensure_dead_letter_subject(self, subject: str) -> JetStreamContext:
        js = await self.jetstream()
        if subject in self._dead_letter_subjects:
            return js
        name = self._settings.dead_letter_stream
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=name, subjects=[subject]))
        else:
            subjects = list(info.config.subjects or [])
            if subject not in subjects:
                config = replace(info.config, subjects=[*subjects, subject])
                await js.update_stream(config)
        self._dead_letter_subjects.add(subject)
        return js

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, key: MessageQueueKey, payload: MessageQueuePayload) -> None:
        """Publish ``payload`` to subject ``key`` and wait for the stream's acknowledgement.

        Raises:
            TypeError: ``payload`` is not a JSON-serialisable dict.
            ValueError: ``key`` is empty.
            NATSUnavailableError: NATS could not be reached or did not acknowledge.
            NATSBackendError: no stream captures ``key``, or the stream refused the message.
        """
        await self.publish_message(key, payload)

    async def publish_message(
        self,
        key: MessageQueueKey,
        payload: MessageQueuePayload,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> str | None:
        """Publish ``payload`` with NATS ``headers`` to subject ``key`` (acknowledged).

        Returns:
            The stream sequence number of the message, as text.

        Raises:
            TypeError: ``payload`` is not a JSON-serialisable dict, or a header is not a string.
            ValueError: ``key`` is empty.
            NATSUnavailableError: NATS could not be reached or did not acknowledge.
            NATSBackendError: no stream captures ``key``, or the stream refused the message.
        """
        _check_key(key)
        js = await self._ensure_stream()
        body = _encode(payload)
        all_headers = _headers(headers)
        all_headers.setdefault("Nats-Msg-Id", uuid.uuid4().hex)
        try:
            ack = await js.publish(key, body, headers=all_headers)
        except Exception as exc:
            self._fail(f"publishing to {key!r}", exc)
        return str(ack.seq)

    async def publish_many(
        self,
        key: MessageQueueKey,
        payloads: Iterable[MessageQueuePayload],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Publish many payloads to subject ``key``; acknowledgements are awaited together.

        Returns:
            The stream sequence numbers, in order.

        Raises:
            TypeError: a payload is not a JSON-serialisable dict.
            ValueError: ``key`` is empty.
            NATSUnavailableError: NATS could not be reached (some may have been stored).
            NATSBackendError: the stream refused a message.
        """
        _check_key(key)
        bodies = [_encode(p) for p in payloads]
        await self._ensure_stream()
        ids: list[str] = []
        for start in range(0, len(bodies), 1000):
            chunk = bodies[start : start + 1000]
            results = await asyncio.gather(
                *(self._publish_body(key, body, headers) for body in chunk)
            )
            ids.extend(results)
        return ids

    async def _publish_body(self, key: str, body: bytes, headers: Mapping[str, str] | None) -> str:
        js = await self.jetstream()
        all_headers = _headers(headers)
        all_headers["Nats-Msg-Id"] = uuid.uuid4().hex
        try:
            ack = await js.publish(key, body, headers=all_headers)
        except Exception as exc:
            self._fail(f"publishing to {key!r}", exc)
        return str(ack.seq)

    # -- consuming -------------------------------------------------------------------------------

    async def consume(self, *, group: ConsumerGroup = None) -> AsyncIterator[MessageQueueMessage]:
        """Yield payloads from the stream through durable consumer ``group``.

        ``group=None`` uses the configured durable consumer, so several processes share the
        work. A message is acknowledged once the caller asks for the next one; one handed out
        when the iterator is closed, or whose process died, is delivered again. An undecodable
        body is logged and moved, as it is, to ``<subject>.dlq``.
        """
        deliveries = self.deliveries(group=group)
        try:
            async for message in deliveries:
                if message.decode_error is None:
                    yield message.payload
                    await self.ack(message)
                else:
                    logger.error(
                        "Moving undecodable message %s of %r to %r: %s",
                        message.message_id,
                        message.key,
                        f"{message.key}.dlq",
                        message.decode_error,
                    )
                    await self._park(message)
        finally:
            await deliveries.aclose()

    def deliveries(self, *, group: ConsumerGroup = None) -> NATSDeliveries:
        """Yield deliveries (``InboundMessage``) that stay unacknowledged until settled.

        ``group=None`` uses the configured durable consumer; another name makes (or joins) a
        durable consumer of that name (characters JetStream does not allow in names, such as
        ``.``, become ``_``), which gets every message of the stream. Messages that
        cannot be decoded are yielded with ``decode_error`` set and the body in ``raw``.
        """
        if self._closed:
            raise RuntimeError("the NATS backend is closed")
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError(f"group must be a non-empty string or None, got {group!r}")
        durable = durable_name(group) if group else self._settings.durable
        reader = PullReader(self._settings, durable, self._subscribe)
        self._readers = [r for r in self._readers if not r.closed]
        self._readers.append(reader)
        return NATSDeliveries(reader)

    # -- settling --------------------------------------------------------------------------------

    async def ack(self, message: InboundMessage) -> None:
        """Acknowledge ``message`` (buffered: sent on the next turn of the event loop)."""
        self.ack_nowait(message)

    def ack_nowait(self, message: InboundMessage) -> None:
        """:meth:`ack` without a coroutine: buffer the acknowledgement of ``message``."""
        reader = self._reader_of(message)
        if reader is not None:
            reader.buffer_ack(message)
        else:  # its reader is closed: acknowledge it on its own
            task = asyncio.get_running_loop().create_task(message.handle.ack())
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def release(self, message: InboundMessage) -> None:
        """Give ``message`` back for immediate redelivery (``nak()``)."""
        msg = self._settle(message)
        try:
            await msg.nak()
        except Exception as exc:
            logger.warning("Releasing %s failed; redelivered after ack_wait: %s", message.key, exc)

    async def release_later(self, message: InboundMessage, delay: float | timedelta) -> None:
        """Have ``message`` delivered again after ``delay`` seconds (``nak(delay=...)``).

        The server holds the message; nothing stays with this consumer.

        Raises:
            ValueError: ``delay`` is negative or not finite.
        """
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
        msg = self._settle(message)
        try:
            # nats-py drops a zero delay: a tiny one keeps the semantics of "no sooner than".
            await msg.nak(delay=max(seconds, 1e-6))
        except Exception as exc:
            logger.warning("Delaying %s failed; redelivered after ack_wait: %s", message.key, exc)

    async def dead_letter(
        self,
        message: InboundMessage,
        destination: MessageQueueKey,
        record: Mapping[str, Any],
    ) -> str | None:
        """Publish ``record`` to subject ``destination`` in the dead-letter stream, wait for its
        acknowledgement, then terminate ``message`` (``term()``: never redelivered).

        The record's ``id`` is the ``Nats-Msg-Id``, so a dead letter written twice (a crash
        before ``term()``) is stored once within the stream's duplicate window.

        Returns:
            The dead letter's sequence number in the dead-letter stream, as text.

        Raises:
            TypeError: ``record`` is not JSON-serialisable.
            ValueError: ``destination`` is empty.
            NATSUnavailableError: NATS did not acknowledge; ``message`` is not settled.
            NATSBackendError: the dead-letter stream refused it (for example ``destination``
                is also captured by the work stream).
        """
        _check_key(destination)
        body = _encode(record)
        headers = _headers(message.headers or None)
        record_id = record.get("id")
        headers["Nats-Msg-Id"] = record_id if isinstance(record_id, str) else uuid.uuid4().hex
        seq = await self._store_dead_letter(destination, body, headers)
        msg = self._settle(message)
        try:
            await msg.term()
        except Exception as exc:
            logger.warning("Terminating %s failed (a duplicate may follow): %s", message.key, exc)
        return seq

    async def _store_dead_letter(self, subject: str, body: bytes, headers: dict[str, str]) -> str:
        try:
            js = await self._ensure_dead_letter_subject(subject)
            ack = await js.publish(
                subject, body, headers=headers, stream=self._settings.dead_letter_stream
            )
        except Exception as exc:
            self._fail(f"dead-lettering to {subject!r}", exc)
        return str(ack.seq)

    async def _park(self, message: InboundMessage) -> None:
        msg: Any = message.handle
        headers = {**(msg.headers or {}), "x-abe-decode-error": str(message.decode_error)}
        headers["Nats-Msg-Id"] = f"poison-{message.message_id}"
        await self._store_dead_letter(f"{message.key}.dlq", msg.data, headers)
        await self._settle(message).term()

    def _settle(self, message: InboundMessage) -> Any:
        reader = self._reader_of(message)
        if reader is not None:
            return reader.settle(message)
        return message.handle

    def _reader_of(self, message: InboundMessage) -> PullReader | None:
        if message.handle is None:
            raise ValueError("the message did not come from a NATS backend's deliveries()")
        key = id(message.handle)
        for reader in self._readers:
            if key in reader.held:
                return reader
        return None

    # -- operations ------------------------------------------------------------------------------

    async def pending(self, group: ConsumerGroup = None) -> int:
        """Messages of the stream the durable consumer has not had acknowledged yet
        (waiting plus delivered-and-unacknowledged).

        Raises:
            NATSBackendError: the consumer does not exist or NATS could not be asked.
        """
        js = await self.jetstream()
        try:
            info = await js.consumer_info(self._settings.stream, group or self._settings.durable)
        except Exception as exc:
            self._fail("reading the consumer's pending count", exc)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def flush(self) -> None:
        """Send every buffered acknowledgement now and flush the connection."""
        for reader in list(self._readers):
            await reader.flush()
        if self._nc is not None and self._nc.is_connected:
            await self._nc.flush(timeout=math.ceil(self._settings.command_timeout))

    async def aclose(self) -> None:
        """Flush acknowledgements, stop every reader and drain the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for reader in list(self._readers):
            await reader.close()
        if self._nc is not None:
            try:
                if self._nc.is_connected:
                    await self._nc.flush(timeout=2)
            except Exception as exc:
                logger.warning("Flushing on close failed: %s", exc)
            await self._nc.close()

    async def close(self) -> None:
        """Same as :meth:`aclose`."""
        await self.aclose()

    async def __aenter__(self) -> NATSBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        s = self._settings
        return (
            f"NATSBackend(url={redact(s.url)!r}, stream={s.stream!r}, "
            f"subjects={list(s.subjects)!r}, durable={s.durable!r})"
        )

    def _fail(self, what: str, exc: BaseException) -> NoReturn:
        text = f"{what} on {redact(self._settings.url)} failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, nats.errors.NoRespondersError | NoStreamResponseError):
            raise NATSBackendError(
                f"{text} (no JetStream stream captures that subject: add it to the stream's "
                "subjects, or to NATS_SUBJECTS before the backend creates the stream)"
            ) from exc
        if isinstance(exc, _UNAVAILABLE):
            raise NATSUnavailableError(text) from exc
        raise NATSBackendError(text) from exc


def durable_name(group: str) -> str:
    """The durable consumer name of consumer group ``group`` (``.``, ``*``, ``>``, ``/``,
    ``\\`` and whitespace replaced by ``_``)."""
    return re.sub(r"[.*>/\\\s]", "_", group)


async def _log_error(exc: Exception) -> None:
    logger.warning("NATS connection: %s: %s", type(exc).__name__, exc)


def _secs(value: float | timedelta | None) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else value


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")


def _encode(payload: Mapping[str, Any]) -> bytes:
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    try:
        return _dumps(payload).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc


def _headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if not headers:
        return {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"header {name!r} must map a string to a string, got {value!r}")
    return dict(headers)
