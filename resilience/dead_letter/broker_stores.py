"""Dead letters kept on a broker, read as a :class:`~.sinks.DeadLetterStore`.

The ``backend`` destination on RabbitMQ and NATS leaves dead letters in the broker itself: as
messages of the queue ``<queue>.dlq`` (RabbitMQ) or of the dead-letter stream (NATS), each
with a ``dlq.v1`` envelope as its body. These stores let ``resilience dlq list / show / replay
/ purge`` and :func:`~.replay.replay` work on them as on a SQLite store.

Broker messages cannot be edited, so replay bookkeeping travels in headers: marking an envelope
as replayed writes it again with ``x-dlq-replayed-at``, ``x-dlq-replay-target`` and
``x-dlq-replays`` (confirmed) and then removes the old copy, so a crash in between keeps both
copies (the same envelope id twice), never none. Messages whose body is not an envelope (a raw
poison message, or one the broker dead-lettered by itself) are skipped and counted in
:attr:`foreign`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any

from .envelope import SCHEMA
from .sinks import AmbiguousId, DeadLetterRecord, Filter

__all__ = ["NATSStore", "RabbitMQStore", "open_broker_store"]

REPLAYED_AT = "x-dlq-replayed-at"
REPLAY_TARGET = "x-dlq-replay-target"
REPLAYS = "x-dlq-replays"


def _envelope(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if isinstance(value, dict) and value.get("schema") == SCHEMA and "id" in value:
        return value
    return None


def _record(envelope: dict[str, Any], headers: Mapping[str, Any], stored_at: float) -> Any:
    replayed = headers.get(REPLAYED_AT)
    return DeadLetterRecord(
        id=str(envelope["id"]),
        envelope=envelope,
        stored_at=stored_at,
        replayed_at=float(replayed) if replayed is not None else None,
        replay_target=str(headers[REPLAY_TARGET]) if REPLAY_TARGET in headers else None,
        replays=int(headers.get(REPLAYS, 0)),
    )


def _select(
    records: list[DeadLetterRecord], where: Filter | None, limit: int | None, newest_first: bool
) -> list[DeadLetterRecord]:
    if newest_first:
        records = list(reversed(records))
    selected = [r for r in records if where is None or where.matches(r)]
    return selected if limit is None else selected[:limit]


def _by_prefix(records: list[DeadLetterRecord], prefix: str) -> DeadLetterRecord | None:
    exact = [r for r in records if r.id == prefix]
    if exact:
        return exact[0]
    found = {r.id: r for r in records if r.id.startswith(prefix)}
    if len(found) > 1:
        raise AmbiguousId(f"{prefix!r} matches {len(found)} dead letters")
    return next(iter(found.values()), None)


class _BrokerStore:
    """What both broker stores share: the query side on top of :meth:`_records`.

    Every public method opens its own connection and closes it before returning, so a store
    can be used from one event loop after another (as the ``dlq`` commands do).
    """

    name: str
    foreign = 0
    """Messages seen in the last read that are not ``dlq.v1`` envelopes (left untouched)."""

    @property
    def path(self) -> str:
        """Where the dead letters are (for messages)."""
        return self.name

    async def _records(self) -> list[DeadLetterRecord]:
        raise NotImplementedError

    async def close(self) -> None:
        """Close the connection, if one is open."""

    async def find(
        self, where: Filter | None = None, *, limit: int | None = None, newest_first: bool = False
    ) -> list[DeadLetterRecord]:
        """Records matching ``where``, oldest first (newest first when asked)."""
        try:
            return _select(await self._records(), where, limit, newest_first)
        finally:
            await self.close()

    async def get(self, id_or_prefix: str) -> DeadLetterRecord | None:
        """The record with this id, or the only one whose id starts with it.

        Raises:
            AmbiguousId: several ids start with ``id_or_prefix``.
        """
        try:
            return _by_prefix(await self._records(), id_or_prefix)
        finally:
            await self.close()

    async def counts(self, where: Filter | None = None) -> dict[str, int]:
        """Number of records matching ``where``, by reason."""
        result: dict[str, int] = {}
        for record in await self.find(where):
            result[record.reason] = result.get(record.reason, 0) + 1
        return result


class RabbitMQStore(_BrokerStore):
    """The dead letters in RabbitMQ queue ``queue`` (``<queue>.dlq``).

    Reading takes every message with ``basic.get`` on a channel of its own and closes the
    channel, which puts them all back in order (their delivery count rises; nothing is lost).

    Args:
        url: The broker (``amqp://...``).
        queue: The dead-letter queue.
    """

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.name = f"rabbitmq:{queue}"
        self._connection: Any = None

    async def _connect(self) -> Any:
        import aio_pika

        if self._connection is None:
            self._connection = await aio_pika.connect(self.url, timeout=10)
        return self._connection

    async def _take_all(self) -> tuple[Any, list[Any]]:
        """A channel holding every message of the queue, unacknowledged."""
        import aio_pika

        connection = await self._connect()
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(self.queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None, []
        held = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            held.append(message)
        return channel, held

    async def _records(self) -> list[DeadLetterRecord]:
        channel, held = await self._take_all()
        try:
            records = []
            self.foreign = 0
            for message in held:
                envelope = _envelope(message.body)
                if envelope is None:
                    self.foreign += 1
                    continue
                stamp = message.timestamp.timestamp() if message.timestamp else 0.0
                records.append(_record(envelope, message.headers or {}, stamp))
            return records
        finally:
            if channel is not None:
                await channel.close()

    async def write(self, envelope: Mapping[str, Any], delivery: Any = None) -> None:
        """Append ``envelope`` to the queue (confirmed)."""
        try:
            await self._publish(envelope, {})
        finally:
            await self.close()

    async def _publish(self, envelope: Mapping[str, Any], headers: dict[str, Any]) -> None:
        import aio_pika

        connection = await self._connect()
        channel = await connection.channel(publisher_confirms=True)
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(dict(envelope)).encode(),
                    headers=headers or None,
                    content_type="application/json",
                    message_id=str(envelope["id"]),
                    timestamp=time.time(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self.queue,
                mandatory=True,
            )
        finally:
            await channel.close()

    async def mark_replayed(self, id: str, *, target: str, at: float | None = None) -> bool:
        """Write the envelope again with replay headers, then remove the old copy."""
        try:
            return await self._mark(id, target, at)
        finally:
            await self.close()

    async def _mark(self, id: str, target: str, at: float | None) -> bool:
        channel, held = await self._take_all()
        try:
            for message in held:
                envelope = _envelope(message.body)
                if envelope is None or str(envelope["id"]) != id:
                    continue
                old = dict(message.headers or {})
                headers = {k: v for k, v in old.items() if not str(k).startswith("x-death")}
                headers[REPLAYED_AT] = str(time.time() if at is None else at)
                headers[REPLAY_TARGET] = target
                headers[REPLAYS] = str(int(old.get(REPLAYS, 0)) + 1)
                await self._publish(envelope, headers)
                await message.ack()
                return True
            return False
        finally:
            if channel is not None:
                await channel.close()

    async def purge(self, where: Filter | None = None) -> int:
        """Remove the records matching ``where`` (all envelopes when ``None``)."""
        try:
            return await self._purge(where)
        finally:
            await self.close()

    async def _purge(self, where: Filter | None) -> int:
        channel, held = await self._take_all()
        removed = 0
        try:
            for message in held:
                envelope = _envelope(message.body)
                if envelope is None:
                    continue
                stamp = message.timestamp.timestamp() if message.timestamp else 0.0
                if where is None or where.matches(_record(envelope, message.headers or {}, stamp)):
                    await message.ack()
                    removed += 1
            return removed
        finally:
            if channel is not None:
                await channel.close()

    async def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None


class NATSStore(_BrokerStore):
    """The dead letters in NATS JetStream stream ``stream`` (optionally one ``subject``).

    Args:
        url: The server (``nats://...``).
        stream: The dead-letter stream (``<stream>_DLQ`` of the work stream by default).
        subject: Only this subject of the stream (``None``: all of them).
    """

    def __init__(self, url: str, stream: str, subject: str | None = None) -> None:
        self.url = url
        self.stream = stream
        self.subject = subject
        self.name = f"nats:{stream}" + (f"/{subject}" if subject else "")
        self._nc: Any = None

    async def _js(self) -> Any:
        import nats

        if self._nc is None:
            self._nc = await nats.connect(self.url, connect_timeout=5, allow_reconnect=False)
        return self._nc.jetstream()

    async def _messages(self) -> list[Any]:
        from nats.js.errors import NotFoundError

        js = await self._js()
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            return []
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(self.stream, seq)
            except NotFoundError:
                continue  # deleted
            if self.subject is None or msg.subject == self.subject:
                out.append(msg)
        return out

    async def _records(self) -> list[DeadLetterRecord]:
        records = []
        self.foreign = 0
        for msg in await self._messages():
            envelope = _envelope(msg.data or b"")
            if envelope is None:
                self.foreign += 1
                continue
            records.append(
                _record(envelope, msg.headers or {}, float(envelope["dead_lettered_at"]))
            )
        return records

    async def write(self, envelope: Mapping[str, Any], delivery: Any = None) -> None:
        """Append ``envelope`` under :attr:`subject` (acknowledged by the stream)."""
        if self.subject is None:
            raise ValueError("NATSStore.write needs a subject")
        try:
            js = await self._js()
            await js.publish(
                self.subject,
                json.dumps(dict(envelope)).encode(),
                headers={"Nats-Msg-Id": str(envelope["id"])},
                stream=self.stream,
            )
        finally:
            await self.close()

    async def mark_replayed(self, id: str, *, target: str, at: float | None = None) -> bool:
        """Store the envelope again with replay headers, then delete the old message."""
        try:
            return await self._mark(id, target, at)
        finally:
            await self.close()

    async def _mark(self, id: str, target: str, at: float | None) -> bool:
        js = await self._js()
        for msg in await self._messages():
            envelope = _envelope(msg.data or b"")
            if envelope is None or str(envelope["id"]) != id:
                continue
            old = dict(msg.headers or {})
            replays = int(old.get(REPLAYS, 0)) + 1
            headers = {k: v for k, v in old.items() if not k.startswith("Nats-")}
            headers[REPLAYED_AT] = str(time.time() if at is None else at)
            headers[REPLAY_TARGET] = target
            headers[REPLAYS] = str(replays)
            headers["Nats-Msg-Id"] = f"{id}:replayed:{replays}"
            await js.publish(msg.subject, msg.data, headers=headers, stream=self.stream)
            await js.delete_msg(self.stream, msg.seq)
            return True
        return False

    async def purge(self, where: Filter | None = None) -> int:
        """Delete the records matching ``where`` (all envelopes when ``None``)."""
        try:
            return await self._purge(where)
        finally:
            await self.close()

    async def _purge(self, where: Filter | None) -> int:
        js = await self._js()
        removed = 0
        for msg in await self._messages():
            envelope = _envelope(msg.data or b"")
            if envelope is None:
                continue
            record = _record(envelope, msg.headers or {}, float(envelope["dead_lettered_at"]))
            if where is None or where.matches(record):
                await js.delete_msg(self.stream, msg.seq)
                removed += 1
        return removed

    async def close(self) -> None:
        """Close the connection."""
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None


def open_broker_store(spec: str, environ: Mapping[str, str]) -> RabbitMQStore | NATSStore:
    """The store named by ``rabbitmq:QUEUE`` or ``nats:STREAM[/SUBJECT]``.

    The connection comes from ``RABBITMQ_URL`` / ``NATS_URL`` (defaults: the local broker).

    Raises:
        ValueError: ``spec`` is neither form.
    """
    kind, _, rest = spec.partition(":")
    if kind == "rabbitmq" and rest:
        url = environ.get("RABBITMQ_URL", "").strip() or "amqp://guest:guest@localhost:5672/"
        return RabbitMQStore(url, rest)
    if kind == "nats" and rest:
        url = environ.get("NATS_URL", "").strip() or "nats://localhost:4222"
        stream, _, subject = rest.partition("/")
        return NATSStore(url, stream, subject or None)
    raise ValueError(
        f"--store {spec!r} is not valid: expected sqlite:PATH, rabbitmq:QUEUE (for example "
        "rabbitmq:orders.dlq) or nats:STREAM[/SUBJECT] (for example nats:ORDERS_DLQ)"
    )
