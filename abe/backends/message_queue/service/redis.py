"""Redis Streams backend: at-least-once delivery, crash recovery, atomic dead-lettering.

Many consumer processes on many hosts share the work of one consumer group on one Redis::

    backend = RedisBackend("redis://localhost:6379/0", streams=["orders"], group="billing")
    await backend.publish("orders", {"id": 7})
    async for message in backend.deliveries():      # at-least-once: ack when done
        ...
        await backend.ack(message)

The wire format is the published ``abe-redis`` provider's (field ``data`` holds the JSON
payload), with transport headers in extra ``h:<name>`` fields, so both can share streams.

Guarantees (see ``docs/redis.md``):

* An entry is acknowledged (XACK) only when the consumer settles it. Acknowledgements are
  buffered and sent as one multi-id XACK per stream together with the next read, after
  ``ack_delay`` at the latest, and on close; a crash before that delivers those entries again.
* Entries a consumer holds are kept alive; entries of a crashed (or stalled) consumer are
  reclaimed by live consumers with XAUTOCLAIM once idle for ``claim_idle`` and counted in
  :attr:`RedisBackend.stats`; their delivery count (from the pending-entries list) feeds the
  attempt limit.
* Dead-lettering writes the record and acknowledges the source entry in one Lua script: both
  happen or neither does.
* Delayed redelivery (:meth:`RedisBackend.release_later`) moves the entry into a sorted set
  per stream and acknowledges it in one Lua script; every consumer moves due entries back into
  the stream, each exactly once, paced by the stream's backlog (see ``_redis_delay``).
* A lost connection or a Redis restart is retried with backoff; reading resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any, NoReturn

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "The Redis backend needs redis-py: install it with `pip install 'abe-resilience[redis]'`"
    ) from exc

from abe.backends.message_queue.base.connection import ConnectionStatus
from abe.backends.message_queue.base.extensions import InboundMessage
from abe.types import ConsumerGroup, MessageQueueKey, MessageQueueMessage, MessageQueuePayload

from ._redis_codec import encode_entry
from ._redis_common import (
    REFUSED_ERRORS,
    TRANSIENT_ERRORS,
    RedisBackendError,
    RedisStats,
    RedisUnavailableError,
    Sleep,
    make_client,
    socket_timeout_of,
    text,
)
from ._redis_delay import (
    DELAY_INDEX_KEY,
    DELIVERIES_HEADER,
    HAND_OVER_LUA,
    DelayScheduler,
    delay_key,
    delay_ms,
    member_of,
    run_pipelined,
)
from ._redis_idempotency import COMPLETE_LUA, Command, CompletionBuffer, completion_args
from ._redis_reader import RedisDeliveries, StreamReader
from ._redis_settings import (
    DEFAULT_GROUP,
    DEFAULT_STREAMS,
    DEFAULT_URL,
    RedisSettings,
    is_pattern,
    redact,
)

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_STREAMS",
    "DEFAULT_URL",
    "RedisBackend",
    "RedisBackendError",
    "RedisSettings",
    "RedisStats",
    "RedisUnavailableError",
]

logger = logging.getLogger(__name__)

_PUBLISH_CHUNK = 1000

_DEAD_LETTER_LUA = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
return id
"""
"""XADD the record to KEYS[1], then XACK entry ARGV[2] of KEYS[2] in group ARGV[1]; an error
in the XADD aborts the script before the XACK."""

_FAILURES: tuple[type[BaseException], ...] = (RedisError, *TRANSIENT_ERRORS)
"""What a Redis call raises when it fails (``TimeoutError`` comes from ``command_timeout``)."""


class RedisBackend:
    """Message-queue backend on Redis Streams with consumer groups (at-least-once).

    Implements the plain ``publish`` / ``consume`` protocol and the extensions
    :class:`~abe.backends.message_queue.base.SettlingBackend`,
    :class:`~abe.backends.message_queue.base.DeadLetteringBackend` and
    :class:`~abe.backends.message_queue.base.HeaderPublishingBackend`.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS, or
            ``unix://``. Defaults to ``redis://localhost:6379/0``.
        streams: Stream keys that ``consume()`` and ``deliveries()`` read (default
            ``("events",)``); a key with ``*``, ``?`` or ``[`` is a pattern (``"tenant:*"``)
            read as every stream matching it, including streams created later (looked up every
            ``discover_interval``). Publishing works on any key.
        group: Consumer group used when ``consume()``/``deliveries()`` get ``group=None``
            (default ``"abe"``). Groups are created on first read, starting at the beginning
            of the stream.
        consumer: This consumer's name in the group; unique per process (default
            ``<hostname>-<pid>``).
        batch_size: Entries per XREADGROUP (default 100).
        block: Seconds one read waits for new entries (default 2).
        claim_idle: Seconds after which entries a consumer stopped looking after are
            reclaimed by others (default 60). Live consumers keep what they hold alive.
        maxlen: Approximate cap on stream length when publishing (default: no trimming).
        ack_batch: Acknowledgements buffered before one XACK is sent at once (default: twice
            ``batch_size``).
        ack_delay: Seconds an acknowledgement may wait for the next read (default 0.1).
        discover_interval: Seconds between look-ups of the streams matching a pattern in
            ``streams`` (default 10).
        settings: Ready :class:`RedisSettings`; the other arguments override its fields.
        client: A ``redis.asyncio.Redis`` to use (``decode_responses=False``, and a
            ``socket_timeout`` longer than ``block``, or none); the backend then does not
            close it.
        sleep: Awaited for reconnection backoff (tests pass a fake).

    Raises:
        ValueError: an invalid setting (the message names it and what is allowed), or a
            ``client`` that decodes responses or would time out blocking reads.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        streams: Iterable[str] | None = None,
        group: str | None = None,
        consumer: str | None = None,
        batch_size: int | None = None,
        block: float | timedelta | None = None,
        claim_idle: float | timedelta | None = None,
        maxlen: int | None = None,
        ack_batch: int | None = None,
        ack_delay: float | timedelta | None = None,
        discover_interval: float | timedelta | None = None,
        settings: RedisSettings | None = None,
        client: aioredis.Redis | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        overrides: dict[str, Any] = {
            name: value
            for name, value in (
                ("url", url),
                ("streams", streams),
                ("group", group),
                ("consumer", consumer),
                ("batch_size", batch_size),
                ("block", block),
                ("claim_idle", claim_idle),
                ("maxlen", maxlen),
                ("ack_batch", ack_batch),
                ("ack_delay", ack_delay),
                ("discover_interval", discover_interval),
            )
            if value is not None
        }
        if isinstance(streams, str):
            raise TypeError("streams must be an iterable of stream keys, not a single string")
        if "streams" in overrides:
            overrides["streams"] = tuple(overrides["streams"])
        self._settings = (
            replace(settings, **overrides) if settings is not None else RedisSettings(**overrides)
        )
        self._owns_client = client is None
        # A socket timeout makes redis-py send through asyncio.wait_for, which loses
        # cancellations before Python 3.12: readers then guard their blocking reads.
        self._guard_reads = False
        if client is None:
            client = make_client(self._settings)
        else:
            socket_timeout = _check_client(client, self._settings)
            self._guard_reads = socket_timeout is not None and sys.version_info < (3, 12)
        self._client = client
        self._dead_letter_script = client.register_script(_DEAD_LETTER_LUA)
        self._hand_over_script = client.register_script(HAND_OVER_LUA)
        self._handovers: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        """Hand-overs of this loop turn, sent together at its end (see :meth:`_hand_over`)."""
        self._scheduler: DelayScheduler | None = None
        self._complete_script = client.register_script(COMPLETE_LUA)
        self._completions: CompletionBuffer | None = None
        self._sleep = sleep
        self._stats = RedisStats()
        self._connection = ConnectionStatus()
        self._readers: weakref.WeakSet[StreamReader] = weakref.WeakSet()
        self._settling: set[asyncio.Task[None]] = set()
        """Acknowledgements :meth:`ack_nowait` had to send in a task."""
        self._closed = False

    @classmethod
    def from_env(cls) -> RedisBackend:
        """Create a backend from ``REDIS_*`` environment variables.

        ``REDIS_URL`` (default ``redis://localhost:6379/0``), ``REDIS_STREAMS``
        (comma-separated keys or patterns such as ``tenant:*``, default ``events``),
        ``REDIS_GROUP`` (default ``abe``), ``REDIS_CONSUMER`` (default ``<hostname>-<pid>``),
        ``REDIS_BATCH_SIZE``, ``REDIS_BLOCK_MS``, ``REDIS_CLAIM_IDLE_MS``, ``REDIS_MAXLEN``,
        ``REDIS_DISCOVER_INTERVAL_MS``, and ``REDIS_PASSWORD`` when the URL carries no
        password.

        Returns:
            The backend (it connects on first use).

        Raises:
            ValueError: a variable is invalid; the message names it, its value and what is
                allowed.
        """
        return cls(settings=RedisSettings.from_environ())

    # -- properties ------------------------------------------------------------------------------

    @property
    def settings(self) -> RedisSettings:
        """The validated settings."""
        return self._settings

    @property
    def stats(self) -> RedisStats:
        """Live counters (published, delivered, reclaimed, acked, dead-lettered, ...)."""
        return self._stats

    @property
    def connection(self) -> ConnectionStatus:
        """Whether reading reaches Redis: updated by every reader, read by health checks."""
        return self._connection

    @property
    def client(self) -> aioredis.Redis:
        """The ``redis.asyncio.Redis`` client in use."""
        return self._client

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, key: MessageQueueKey, payload: MessageQueuePayload) -> None:
        """Append ``payload`` to stream ``key`` (XADD field ``data``, as abe-redis writes).

        Raises:
            TypeError: ``payload`` is not a JSON-serialisable dict.
            ValueError: ``key`` is empty.
            RedisUnavailableError: Redis could not be reached (after a few quick retries).
            RedisBackendError: Redis refused the write.
        """
        await self.publish_message(key, payload)

    async def publish_message(
        self,
        key: MessageQueueKey,
        payload: MessageQueuePayload,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> str | None:
        """Append ``payload`` with transport ``headers`` (fields ``h:<name>``) to stream ``key``.

        Returns:
            The entry id.

        Raises:
            TypeError: ``payload`` is not a JSON-serialisable dict, or a header is not a string.
            ValueError: ``key`` is empty.
            RedisUnavailableError: Redis could not be reached (after a few quick retries).
            RedisBackendError: Redis refused the write.
        """
        _check_key(key)
        fields = encode_entry(payload, headers)
        maxlen = self._settings.maxlen
        try:
            async with self._timeout():
                entry_id = await self._client.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        except _FAILURES as exc:
            self._fail(f"publishing to stream {key!r}", exc)
        self._stats.published += 1
        return text(entry_id)

    async def publish_many(
        self,
        key: MessageQueueKey,
        payloads: Iterable[MessageQueuePayload],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Append many payloads to stream ``key`` in pipelined round trips (1000 per trip).

        Every payload is encoded before anything is sent, so an invalid one publishes nothing.

        Returns:
            The entry ids, in order.

        Raises:
            TypeError: a payload is not a JSON-serialisable dict.
            ValueError: ``key`` is empty.
            RedisUnavailableError: Redis could not be reached; the message says how many
                entries were written before the failure.
            RedisBackendError: Redis refused a write.
        """
        _check_key(key)
        encoded = [encode_entry(payload, headers) for payload in payloads]
        maxlen = self._settings.maxlen
        ids: list[str] = []
        for start in range(0, len(encoded), _PUBLISH_CHUNK):
            pipe = self._client.pipeline(transaction=False)
            for fields in encoded[start : start + _PUBLISH_CHUNK]:
                pipe.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
            try:
                async with self._timeout():
                    results = await pipe.execute()
            except _FAILURES as exc:
                self._fail(
                    f"publishing to stream {key!r} ({len(ids)} of {len(encoded)} written)", exc
                )
            ids.extend(text(r) for r in results)
            self._stats.published += len(results)
        return ids

    # -- consuming -------------------------------------------------------------------------------

    async def consume(self, *, group: ConsumerGroup = None) -> AsyncIterator[MessageQueueMessage]:
        """Yield payloads from the configured streams in consumer group ``group``.

        ``group=None`` uses the configured group (``"abe"`` by default), so several processes
        share the work. An entry is acknowledged once the caller asks for the next one (its
        handler has returned); one that was handed out when the iterator is closed, or whose
        process died, is delivered again. Undecodable entries are logged and acknowledged
        (they stay readable in the stream by id).
        """
        reader = self._reader(group)
        source = reader.messages()  # an async generator: closed below
        try:
            async for message in source:
                if message.decode_error is None:
                    yield message.payload
                else:
                    logger.error(
                        "Skipping undecodable entry %s of %r (acknowledged, still in the "
                        "stream): %s",
                        message.message_id,
                        message.key,
                        message.decode_error,
                    )
                await reader.ack(message)
        finally:
            await source.aclose()

    def deliveries(self, *, group: ConsumerGroup = None) -> AsyncIterator[InboundMessage]:
        """Yield deliveries (``InboundMessage``) that stay pending until acked or released.

        ``group=None`` uses the configured group. Entries that cannot be decoded are yielded
        with ``decode_error`` set and the raw ``data`` bytes in ``raw``.
        """
        deliveries = RedisDeliveries(self._reader(group))
        self._start_scheduler()
        return deliveries

    def _start_scheduler(self) -> None:
        # Every consumer moves due delayed entries back (the scripts make that safe).
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first release_later or deliveries() inside a loop
        if self._scheduler is None:
            settings = self._settings
            self._scheduler = DelayScheduler(
                self._client,
                [key for key in settings.streams if not is_pattern(key)],
                patterns=[key for key in settings.streams if is_pattern(key)],
                discover_interval=settings.discover_interval,
            )
        self._scheduler.start()

    @property
    def delay_scheduler(self) -> DelayScheduler | None:
        """The task moving due delayed entries back into the streams (``None`` before
        :meth:`deliveries` or :meth:`release_later` ran in an event loop)."""
        return self._scheduler

    def _reader(self, group: ConsumerGroup) -> StreamReader:
        if self._closed:
            raise RuntimeError("the Redis backend is closed")
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError(f"group must be a non-empty string or None, got {group!r}")
        reader = StreamReader(
            self._client,
            self._settings,
            group or self._settings.group,
            self._stats,
            self._sleep,
            guard_reads=self._guard_reads,
            connection=self._connection,
        )
        self._readers.add(reader)
        return reader

    # -- settling --------------------------------------------------------------------------------

    async def ack(self, message: InboundMessage) -> None:
        """Acknowledge ``message`` (buffered; see the module docs for when it is sent).

        Raises:
            RedisBackendError: the acknowledgement had to be sent now (the reader is closed)
                and Redis did not take it; the entry will be delivered again.
        """
        handle = message.handle
        if type(handle) is StreamReader:
            if handle.buffer_ack(message):
                try:
                    await handle.flush_due()
                except _FAILURES as exc:
                    self._fail(f"acknowledging entry {message.message_id}", exc)
            return
        try:
            async with self._timeout():
                await self._client.xack(message.key, self._group_of(message), _id_of(message))
        except _FAILURES as exc:
            self._fail(f"acknowledging entry {message.message_id}", exc)
        self._stats.acked += 1

    def ack_nowait(self, message: InboundMessage) -> None:
        """:meth:`ack` without a coroutine: buffer the acknowledgement of ``message``.

        A full buffer is flushed by one background task (however many acknowledgements arrive
        meanwhile); what must be sent at once (a closed reader, a message that did not come
        from ``deliveries()``) is sent by a task of its own. If Redis does not take it, that is
        logged and the entry is delivered again.
        """
        handle = message.handle
        if type(handle) is StreamReader:
            if handle.buffer_ack(message):
                if handle.closed:  # nobody reads again: send now, and log a failure
                    self._in_background(handle.flush_due(), message)
                else:  # one background flush for the lot, not a task per acknowledgement
                    handle.request_flush()
            return
        self._in_background(self.ack(message), message)

    def _in_background(self, settle: Coroutine[Any, Any, None], message: InboundMessage) -> None:
        task = asyncio.get_running_loop().create_task(settle)
        self._settling.add(task)
        task.add_done_callback(functools.partial(self._settled, message))

    def _settled(self, message: InboundMessage, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.warning(
                "Acknowledging entry %s failed; it will be delivered again: %s",
                message.message_id,
                exc,
            )

    async def release(self, message: InboundMessage) -> None:
        """Hand ``message`` back to its group: the next reclaim by any consumer redelivers it.

        The entry stays in the pending-entries list, marked idle, so it comes back at once
        (with its delivery count raised) rather than after ``claim_idle``.

        Raises:
            RedisBackendError: Redis could not be told; the entry is then redelivered after
                ``claim_idle``.
        """
        handle = message.handle
        try:
            if type(handle) is StreamReader:
                await handle.release(message)
                return
            async with self._timeout():
                await self._client.xclaim(
                    message.key,
                    self._group_of(message),
                    self._settings.consumer,
                    0,
                    [_id_of(message)],
                    idle=self._settings.claim_idle_ms,
                    justid=True,
                )
        except _FAILURES as exc:
            self._fail(f"releasing entry {message.message_id}", exc)
        self._stats.released += 1

    async def release_later(self, message: InboundMessage, delay: float | timedelta) -> None:
        """Acknowledge ``message`` and have it delivered again after ``delay``, atomically.

        One Lua script XACKs the entry and adds it, with its fields and current headers, to the
        sorted set ``abe:delayed:<stream>`` scored by its due time on the Redis server's clock
        (``delay`` is rounded up to whole milliseconds). The scheduler of any consumer of the
        stream then appends it to the stream again as a new entry (new id), with its delivery
        count raised, once due and once the stream's consumer group has room for it (due
        entries are re-added paced by the group's unread backlog, see ``docs/redis.md``). A
        crash can neither lose nor duplicate it: the move is one script, and the delay set
        persists like the stream does.

        Raises:
            ValueError: ``delay`` is negative or not finite, or ``message`` has no id.
            RedisUnavailableError: Redis could not be reached; ``message`` is not settled.
            RedisBackendError: the script failed; ``message`` is not settled.
        """
        ms = delay_ms(delay)
        entry_id = _id_of(message)
        headers = dict(message.headers)
        headers[DELIVERIES_HEADER] = str(max(1, message.delivery_count))
        fields = encode_entry(message.payload, headers)
        member = member_of(entry_id, fields)
        handle = message.handle
        reader = handle if type(handle) is StreamReader else None
        held = reader.settle(message) if reader is not None else None
        try:
            async with self._timeout():
                await self._hand_over(
                    [message.key, delay_key(message.key), DELAY_INDEX_KEY],
                    [self._group_of(message), entry_id, ms, member],
                )
        except _FAILURES as exc:
            if held is not None and reader is not None:
                reader.hold(message, held)
            self._fail(f"delaying entry {entry_id} of {message.key!r}", exc)
        self._start_scheduler()
        if self._scheduler is not None:
            self._scheduler.add(message.key)
            self._scheduler.wake(ms / 1000)

    def _hand_over(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Run the hand-over script for one entry: the hand-overs asked for in one loop turn
        (the consumer's slots failing together) go out in one pipelined round trip, each still
        its own atomic script with its own reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._handovers:
            loop.call_soon(self._send_handovers)
        self._handovers.append((keys, args, future))
        return future

    def _send_handovers(self) -> None:
        batch, self._handovers = self._handovers, []
        task = asyncio.get_running_loop().create_task(self._hand_over_batch(batch))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _hand_over_batch(
        self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            async with self._timeout():
                replies = await run_pipelined(
                    self._client, self._hand_over_script, [(k, a) for k, a, _ in batch]
                )
        except BaseException as exc:
            for _, _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller gave up (timed out, cancelled)
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def delayed(self, key: MessageQueueKey | None = None) -> int:
        """Entries waiting in the delay set of ``key`` (or of every stream read so far).

        Raises:
            RedisBackendError: Redis could not be asked.
        """
        total = 0
        if key is not None:
            streams: Iterable[str] = (key,)
        elif self._scheduler is not None:
            streams = tuple(self._scheduler.streams)  # with the streams of patterns found
        else:
            streams = [s for s in self._settings.streams if not is_pattern(s)]
        for stream in streams:
            try:
                async with self._timeout():
                    total += int(await self._client.zcard(delay_key(stream)))
            except _FAILURES as exc:
                self._fail(f"counting delayed entries of {stream!r}", exc)
        return total

    async def dead_letter(
        self,
        message: InboundMessage,
        destination: MessageQueueKey,
        record: Mapping[str, Any],
    ) -> str | None:
        """Append ``record`` to stream ``destination`` and acknowledge ``message``, atomically.

        One Lua script runs the XADD (field ``data`` holds the record as JSON; the message's
        headers travel along) and then the XACK. Unlike MULTI/EXEC, which goes on with the
        XACK when the XADD fails at run time (a destination key of the wrong type), the script
        stops at the first error: the entry is either dead-lettered and acknowledged, or
        neither, and a crash cannot lose it.

        Returns:
            The id of the dead-letter entry.

        Raises:
            TypeError: ``record`` is not JSON-serialisable.
            ValueError: ``destination`` is empty, or ``message`` has no id.
            RedisUnavailableError: Redis could not be reached; nothing was written or acked.
            RedisBackendError: the transaction failed; nothing was written or acked.
        """
        _check_key(destination)
        entry_id = _id_of(message)
        fields = encode_entry(record, message.headers or None)
        handle = message.handle
        reader = handle if type(handle) is StreamReader else None
        held = reader.settle(message) if reader is not None else None
        args: list[str | bytes] = [self._group_of(message), entry_id]
        for name, value in fields.items():
            args.append(name)
            args.append(value)
        try:
            async with self._timeout():
                record_id = await self._dead_letter_script(
                    keys=[destination, message.key], args=args
                )
        except _FAILURES as exc:
            if held is not None and reader is not None:
                reader.hold(message, held)
            what = f"dead-lettering entry {entry_id} of {message.key!r} to {destination!r}"
            self._fail(what, exc)
        self._stats.dead_lettered += 1
        return text(record_id)

    def complete_idempotent_nowait(
        self,
        message: InboundMessage,
        record_key: str,
        owner: str,
        ttl: float,
        effects: Iterable[Command] = (),
    ) -> None:
        """Buffer an idempotency completion that replaces the acknowledgement of ``message``.

        Buffered completions are sent like acknowledgements (after ``ack_delay``, or at once
        when ``ack_batch`` of them wait), all in one Lua script that, for each message whose
        claim ``owner`` still holds, runs ``effects``, writes the completion record (kept ``ttl``
        seconds) and XACKs the entry; a message whose claim was taken over is left pending.
        If Redis does not take them, the entries stay pending and are delivered again.

        Args:
            message: A delivery from this backend.
            record_key: The claim key; it becomes the completion record.
            owner: The claim's owner token.
            ttl: Seconds the completion record is kept.
            effects: Redis commands of the handler's, run just before the record is written.

        Raises:
            ValueError: ``message`` has no id.
        """
        entry_id = _id_of(message)
        handle = message.handle
        if type(handle) is StreamReader:
            handle.settle(message)  # the completion acknowledges it; a later ack is a no-op
        buffer = self._completions
        if buffer is None:
            s = self._settings
            buffer = self._completions = CompletionBuffer(
                self._complete_script, s.ack_limit, s.ack_delay
            )
        args = completion_args(owner, ttl, self._group_of(message), entry_id, effects)
        buffer.add(record_key, message.key, args)
        self._stats.acked += 1

    def take_idempotent_completions(self) -> tuple[list[str], list[Any]] | None:
        """Take the completions :meth:`complete_idempotent_nowait` buffered, for a caller that
        sends them (``EVALSHA`` of ``COMPLETE_SHA`` with these KEYS and ARGV) in a pipeline
        with a command of its own, saving their round trip.

        Returns:
            ``(keys, args)``, or ``None`` when none are buffered.
        """
        buffer = self._completions
        return None if buffer is None else buffer.take()

    async def send_idempotent_completions(self, keys: list[str], args: list[Any]) -> None:
        """Send completions taken with :meth:`take_idempotent_completions` on their own.

        Raises:
            RedisBackendError: Redis did not take them; their entries stay pending and are
                delivered again.
        """
        try:
            async with self._timeout():
                await self._complete_script(keys=keys, args=args)
        except _FAILURES as exc:
            self._fail("writing idempotency completions", exc)

    # -- operations ------------------------------------------------------------------------------

    async def pending(
        self, key: MessageQueueKey | None = None, *, group: ConsumerGroup = None
    ) -> int:
        """Entries delivered in ``group`` and not acknowledged yet (XPENDING).

        Args:
            key: One stream, or ``None`` for every configured stream (and every stream
                matching a configured pattern).
            group: The consumer group (the configured one when ``None``).

        Returns:
            The number of pending entries; 0 for a stream or group that does not exist.

        Raises:
            RedisBackendError: Redis could not be asked.
        """
        streams = [key] if key is not None else await self._configured_streams()
        if not streams:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for stream in streams:  # every stream in one round trip
            pipe.xpending(stream, group or self._settings.group)
        try:
            async with self._timeout():
                replies = await pipe.execute(raise_on_error=False)
        except _FAILURES as exc:
            self._fail(f"reading pending entries of {len(streams)} stream(s)", exc)
        total = 0
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, BaseException):
                if "NOGROUP" in str(reply):
                    continue
                self._fail(f"reading pending entries of {stream!r}", reply)
            total += int(reply["pending"])
        return total

    async def _configured_streams(self) -> list[str]:
        """The configured stream keys, each pattern replaced by the streams matching it now."""
        streams: list[str] = []
        for key in self._settings.streams:
            if not is_pattern(key):
                streams.append(key)
                continue
            try:
                async with self._timeout():
                    found = [
                        text(k)
                        async for k in self._client.scan_iter(match=key, count=1000, _type="stream")
                    ]
            except _FAILURES as exc:
                self._fail(f"looking up the streams matching {key!r}", exc)
            streams.extend(sorted(found))
        return list(dict.fromkeys(streams))

    async def flush(self) -> None:
        """Send every buffered acknowledgement now.

        Raises:
            RedisBackendError: Redis did not take them (they stay buffered).
        """
        for reader in list(self._readers):
            try:
                await reader.flush()
            except _FAILURES as exc:
                self._fail("flushing acknowledgements", exc)
        if self._completions is not None:
            try:
                await self._completions.flush()
            except _FAILURES as exc:
                self._fail("writing idempotency completions", exc)

    async def aclose(self) -> None:
        """Flush acknowledgements, stop every reader and close the connection pool.

        Idempotent. Entries read but never handed out are given back to the group.
        """
        if self._closed:
            return
        self._closed = True
        if self._scheduler is not None:
            await self._scheduler.stop()
        if self._settling:
            await asyncio.wait(set(self._settling))
        if self._completions is not None:
            with contextlib.suppress(*_FAILURES):
                await self._completions.flush()  # left pending on failure: delivered again
        for reader in list(self._readers):
            await reader.close()
        if self._owns_client:
            await self._client.aclose()

    async def close(self) -> None:
        """Same as :meth:`aclose`."""
        await self.aclose()

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        s = self._settings
        return (
            f"RedisBackend(url={redact(s.url)!r}, streams={list(s.streams)!r}, "
            f"group={s.group!r}, consumer={s.consumer!r})"
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _group_of(self, message: InboundMessage) -> str:
        return message.group or self._settings.group

    def _timeout(self) -> asyncio.Timeout:
        return asyncio.timeout(self._settings.command_timeout)

    def _fail(self, what: str, exc: BaseException) -> NoReturn:
        where = redact(self._settings.url)
        text = f"{what} on {where} failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, REFUSED_ERRORS):
            raise RedisUnavailableError(text) from exc
        raise RedisBackendError(text) from exc


_BLOCK_MARGIN = 0.5
"""Seconds a blocking read's reply may take beyond ``block`` before the socket times out."""


def _check_client(client: aioredis.Redis, settings: RedisSettings) -> float | None:
    """Refuse a client the backend cannot work with; return its socket timeout."""
    if client.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError("the Redis client must be created with decode_responses=False")
    socket_timeout = socket_timeout_of(client)
    if socket_timeout is not None and settings.block + _BLOCK_MARGIN > socket_timeout:
        raise ValueError(
            f"block ({settings.block:g}s) must be at least {_BLOCK_MARGIN:g}s shorter than the "
            f"client's socket_timeout ({socket_timeout:g}s), or every read that waits for new "
            "entries times out and reconnects: pass a shorter block=, or create the client "
            "with socket_timeout=None"
        )
    return socket_timeout


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")


def _id_of(message: InboundMessage) -> str:
    if not message.message_id:
        raise ValueError("the message has no id: it did not come from a Redis stream")
    return message.message_id
