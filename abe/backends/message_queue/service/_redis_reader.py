"""One consumer-group reader of the Redis Streams backend: reads in batches, settles, acks.

A :class:`StreamReader` backs one ``deliveries()`` (or ``consume()``) iterator. It reads new
entries of every stream in one XREADGROUP (``COUNT`` applies per stream, so a busy stream
cannot starve the others) and buffers acknowledgements into one multi-id XACK per stream, sent
in the same round trip as the next read (or after ``ack_delay``, or when more are waiting than
``ack_batch`` and the last read together). A read is decoded into deliveries a few entries at
a time as they are handed out (every entry is held, and kept alive, from the read on), so a
read across many streams does not turn into tens of thousands of deliveries alive together.
Consumer groups are created in one pipelined round trip for all streams; streams matching a
pattern (``tenant:*``) are looked up with SCAN at the start and every ``discover_interval``.
Reclaiming idle entries, keeping held ones alive and reconnecting live in
:mod:`._redis_recovery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from abe.backends.message_queue.base.connection import ConnectionStatus
from abe.backends.message_queue.base.extensions import InboundMessage

from ._redis_codec import decode_batch
from ._redis_common import LOGGER_NAME, RedisStats, Sleep, text
from ._redis_recovery import IDLE_STREAMS_LUA, keep_alive, reclaim, resilient, unswallowed
from ._redis_settings import is_pattern

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ._redis_settings import RedisSettings

__all__ = ["RedisDeliveries", "StreamReader"]

logger = logging.getLogger(LOGGER_NAME)

_monotonic = time.monotonic

DECODE_CHUNK = 64
"""Entries of a read decoded at a time (see :meth:`StreamReader.decode_more`)."""

_XREADGROUP = b"XREADGROUP"
"""The read's command name, as bytes: redis-py looks reply callbacks up by the name as given,
finds none for this spelling, and hands the reply over as the server sent it (stream ->
entries, each entry ``[id, [name, value, ...]]``), so no dict is built per entry; the reader
decodes that shape and redis-py's parsed one alike (a client that parses anyway still works)."""

ACK_CHUNK = 8192
"""Acknowledgements of one large read (across many streams) sent in the background while the
rest of the read is handled (see :meth:`StreamReader.request_flush`): Redis applies them on
its own core meanwhile, and only the last few wait for the next read."""


class StreamReader:
    """Reads one consumer group's entries from the configured streams.

    Args:
        client: The backend's Redis client (``decode_responses=False``).
        settings: The backend's settings.
        group: The consumer group.
        stats: Counters to update.
        sleep: Awaited for reconnection backoff.
        guard_reads: Run each blocking read in a task of its own (see
            :func:`._redis_recovery.unswallowed`), for a client whose socket timeout makes
            redis-py send through ``asyncio.wait_for``, which loses cancellations before
            Python 3.12.
        connection: Where reachability is recorded (a new status when ``None``).
    """

    def __init__(
        self,
        client: Redis,
        settings: RedisSettings,
        group: str,
        stats: RedisStats,
        sleep: Sleep,
        *,
        guard_reads: bool = False,
        connection: ConnectionStatus | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.group = group
        self.consumer = settings.consumer
        self.stats = stats
        self.sleep = sleep
        """Awaited for reconnection backoff."""
        self.patterns = tuple(key for key in settings.streams if is_pattern(key))
        """Stream patterns (``tenant:*``) whose matching streams are read too."""
        self.streams: list[str] = []
        """The streams read: the configured keys, then the streams found for the patterns."""
        self.discovered: set[str] = set()
        """Streams found through a pattern (dropped again when they disappear)."""
        self._key_of: dict[bytes, str] = {}
        self._read_ids: dict[str, str] = {}
        self.unsettled: dict[str, dict[str, bytes]] = {}
        """Per stream: ids (str -> bytes) read by this reader and neither acked nor released."""
        for key in settings.streams:
            if key not in self.patterns:
                self._add_stream(key)
        self.waiting: deque[InboundMessage] = deque()
        """Decoded (or reclaimed) and not yet handed out."""
        self.undecoded: deque[list[Any]] = deque()
        """Read and not decoded yet: ``[key, entries, index of the next one]`` per stream
        reply, in order (already held; see :meth:`decode_more`)."""
        self.acks: dict[str, list[bytes]] = {}
        """Per stream with acknowledgements buffered: their entry ids."""
        self._ack_limit = settings.ack_limit
        self.ack_count = 0
        self.release_pending = False
        self.yield_soon = False
        """A background flush was asked for: the iterator lets the event loop run it before it
        decodes the next chunk (a large read is otherwise handed out in one go)."""
        self.closed = False
        self._ack_timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.cursors: dict[str, str] = {}
        """Per stream: where an unfinished reclaim scan goes on."""
        self.next_reclaim = 0.0
        """Monotonic time of the next reclaim scan (the first one runs at start)."""
        self.next_discovery = 0.0 if self.patterns else float("inf")
        """Monotonic time of the next look-up of streams matching the patterns."""
        self.groups_ready = False
        self.owner: asyncio.Task[Any] | None = None
        """The task iterating :meth:`messages` (set when it starts)."""
        self.cancel_baseline = 0
        """:attr:`owner`'s ``cancelling()`` when it started: more means a lost cancellation."""
        self._guard_reads = guard_reads
        self._idle_script: Any = None
        self.connection = connection if connection is not None else ConnectionStatus()
        """Whether the last attempt reached Redis (shared by the backend's readers)."""

    # -- the iterator -------------------------------------------------------------------------

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        """Yield deliveries until cancelled or closed (the body of ``deliveries()``)."""
        waiting = self.waiting
        owner = self.owner = asyncio.current_task()
        self.cancel_baseline = owner.cancelling() if owner is not None else 0
        try:
            await resilient(self, self.ensure_groups)
            self._heartbeat = asyncio.create_task(keep_alive(self))
            while True:
                if self.yield_soon:
                    self.yield_soon = False
                    await asyncio.sleep(0)  # the flush task sends its XACKs, then we go on
                if self.release_pending:
                    await resilient(self, self._reclaim)
                if waiting:
                    yield waiting.popleft()
                    continue
                if self.undecoded:
                    self.decode_more()
                    continue
                if self.closed:
                    return  # the backend was closed under us
                now = _monotonic()
                if now >= self.next_discovery:
                    await resilient(self, self.discover)
                if now >= self.next_reclaim:
                    await resilient(self, self._reclaim)
                    if waiting:
                        continue
                await resilient(self, self._fill)
        finally:
            await self.close()

    def take_nowait(self) -> InboundMessage | None:
        """The next delivery :meth:`messages` would yield, if one was read and is waiting;
        ``None`` when the generator has work to do first (not started, nothing waiting, a
        release to reclaim, closing)."""
        waiting = self.waiting
        if self.owner is None or self.release_pending or self.closed:
            return None
        if not waiting:
            if not self.undecoded or self.yield_soon:
                return None  # (a flush to let run: at most once per decoded chunk)
            self.decode_more()
            if not waiting:
                return None
        return waiting.popleft()

    # -- reading ------------------------------------------------------------------------------

    def timeout(self, extra: float = 0.0) -> asyncio.Timeout:
        """A deadline of ``command_timeout`` (plus ``extra``) seconds for one Redis call."""
        return asyncio.timeout(self.settings.command_timeout + extra)

    def idle_script(self) -> Any:
        """:data:`._redis_recovery.IDLE_STREAMS_LUA`, registered with :attr:`client` (once)."""
        if self._idle_script is None:
            self._idle_script = self.client.register_script(IDLE_STREAMS_LUA)
        return self._idle_script

    def _add_stream(self, key: str) -> None:
        self.streams.append(key)
        self._key_of[key.encode()] = key
        self._read_ids[key] = ">"
        self.unsettled.setdefault(key, {})

    def _drop_stream(self, key: str) -> None:
        """Stop reading ``key`` (a discovered stream that was deleted)."""
        self.streams.remove(key)
        self.discovered.discard(key)
        self._key_of.pop(key.encode(), None)
        self._read_ids.pop(key, None)
        self.cursors.pop(key, None)
        if not self.unsettled.get(key):
            self.unsettled.pop(key, None)

    async def ensure_groups(self) -> None:
        """Create the consumer group on every stream, in one pipelined round trip.

        Configured streams are created when missing (``MKSTREAM``); a discovered stream that
        no longer exists is dropped instead.

        Raises:
            redis.exceptions.ResponseError: Redis refused to create a group.
        """
        if self.groups_ready:
            return  # resilient() runs this before any step while the groups are not ready
        await self._create_groups(list(self.streams))
        self.groups_ready = True

    async def _create_groups(self, keys: list[str]) -> None:
        if not keys:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.xgroup_create(key, self.group, id="0", mkstream=key not in self.discovered)
        async with self.timeout():
            results = await pipe.execute(raise_on_error=False)
        for key, result in zip(keys, results, strict=True):
            if not isinstance(result, BaseException) or "BUSYGROUP" in str(result):
                continue
            if key in self.discovered and isinstance(result, ResponseError):
                logger.info("Stream %r is gone; no longer reading it", key)
                self._drop_stream(key)
                continue
            raise result

    async def discover(self) -> None:
        """Look up the streams matching the patterns (SCAN ... TYPE stream); read new ones.

        A new stream's group starts at its first entry, so what was published before it was
        found is delivered too.
        """
        self.next_discovery = _monotonic() + self.settings.discover_interval
        found: set[str] = set()
        for pattern in self.patterns:
            cursor: int = 0
            while True:
                async with self.timeout():
                    cursor, keys = await self.client.scan(
                        cursor, match=pattern, count=1000, _type="stream"
                    )
                found.update(text(key) for key in keys)
                if not cursor:
                    break
        new = sorted(found.difference(self._read_ids))
        if not new:
            return
        for key in new:
            self.discovered.add(key)
            self._add_stream(key)
        if self.groups_ready:
            await self._create_groups(new)
        logger.info(
            "Reading %d new stream(s) matching %s: %s",
            len(new),
            ", ".join(repr(p) for p in self.patterns),
            ", ".join(new[:10]) + (", ..." if len(new) > 10 else ""),
        )

    async def _reclaim(self) -> None:
        await reclaim(self)

    async def _fill(self) -> None:
        """Send buffered acks and read the next batch, in one round trip."""
        timeout_ms = self.settings.block_ms
        until_next = min(self.next_reclaim, self.next_discovery) - _monotonic()
        timeout_ms = max(1, min(timeout_ms, int(until_next * 1000)))
        if not self._read_ids:  # only patterns, and nothing matches them yet
            await self.flush()
            await asyncio.sleep(timeout_ms / 1000)
            return
        acks = self._take_acks()
        try:
            async with self.timeout(timeout_ms / 1000):
                if acks:
                    pipe = self.client.pipeline(transaction=False)
                    for key, ids in acks.items():
                        pipe.xack(key, self.group, *ids)
                    pipe.execute_command(*self._read_command(timeout_ms))
                    if self._guard_reads:
                        results = await unswallowed(pipe.execute())
                    else:
                        results = await pipe.execute()
                    response = results[-1]
                else:
                    command = self._read_command(timeout_ms)
                    read = self.client.execute_command(*command)  # type: ignore[no-untyped-call]
                    response = await (unswallowed(read) if self._guard_reads else read)
            if acks:
                self._acked(acks)
        except BaseException:
            self._restore_acks(acks)
            raise
        if not response:
            return
        undecoded = self.undecoded
        key_of = self._key_of
        unsettled = self.unsettled
        entries_read = 0
        replies = response.items() if type(response) is dict else response  # RESP3: a map
        for stream, entries in replies:
            key = key_of.get(stream) or stream.decode()
            held = unsettled[key]
            for entry_id, fields in entries:
                if fields is not None:  # held (kept alive) from now on, decoded when due
                    held[entry_id.decode()] = entry_id
            undecoded.append([key, entries, 0])
            entries_read += len(entries)
        if not self.settings.ack_batch:
            # A read across many streams can be far bigger than batch_size: its acks go out
            # with the next read rather than in early flushes of a few ids per stream; those
            # of a very large read go out every ACK_CHUNK in the background meanwhile (entries
            # come stream by stream, so each such flush holds long runs of ids per stream).
            size = entries_read + len(self.waiting) + 1
            self._ack_limit = max(self.settings.ack_limit, min(size, ACK_CHUNK))

    def decode_more(self) -> None:
        """Decode the next few entries read (at most :data:`DECODE_CHUNK`) into :attr:`waiting`.

        Entries are decoded shortly before they are handed out rather than a whole read at
        once, so the deliveries of a large read (tens of thousands of entries across many
        streams) are not all alive together: each lives from a little before its handler
        runs until it is settled, and the garbage collector finds it young.
        """
        pending = self.undecoded[0]
        key, entries, start = pending
        end = start + DECODE_CHUNK
        if end >= len(entries):
            self.undecoded.popleft()
            chunk = entries[start:] if start else entries
        else:
            pending[2] = end
            chunk = entries[start:end]
        waiting = self.waiting
        before = len(waiting)
        poison = decode_batch(key, chunk, self.group, self, None, waiting.append)
        stats = self.stats
        stats.delivered += len(waiting) - before
        if poison:
            stats.poison += poison

    def _read_command(self, timeout_ms: int) -> list[Any]:
        streams = self._read_ids
        return [
            _XREADGROUP,
            "GROUP",
            self.group,
            self.consumer,
            "COUNT",
            self.settings.batch_size,
            "BLOCK",
            timeout_ms,
            "STREAMS",
            *streams.keys(),
            *streams.values(),
        ]

    # -- settling -----------------------------------------------------------------------------

    def settle(self, message: InboundMessage) -> bytes | None:
        """Forget ``message`` as held; its entry id, or ``None`` when it was settled already."""
        held = self.unsettled.get(message.key)
        if held is None:
            return None
        return held.pop(message.message_id, None)  # type: ignore[arg-type]

    def hold(self, message: InboundMessage, entry_id: bytes) -> None:
        """Mark ``message`` as held again (a settlement attempt failed)."""
        held = self.unsettled.get(message.key)
        if held is not None:
            held[message.message_id] = entry_id  # type: ignore[index]

    def buffer_ack(self, message: InboundMessage) -> bool:
        """Buffer the acknowledgement of ``message``; ``True`` when :meth:`flush_due` must run.

        Synchronous, so the per-message cost of an ack is a few dict operations.
        """
        key = message.key
        try:
            entry_id = self.unsettled[key].pop(message.message_id)  # type: ignore[arg-type]
        except KeyError:
            return False  # settled already (dead-lettered, released, or acked twice)
        ids = self.acks.get(key)
        if ids is None:
            self.acks[key] = [entry_id]
        else:
            ids.append(entry_id)
        count = self.ack_count = self.ack_count + 1
        if count >= self._ack_limit or self.closed:
            return True
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                self.settings.ack_delay, self._flush_soon
            )
        return False

    async def flush_due(self) -> None:
        """Flush after :meth:`buffer_ack` asked for it.

        Raises:
            redis.exceptions.RedisError: the reader is closed and Redis did not take the
                acknowledgements (an open reader keeps them buffered and retries instead).
        """
        if self.closed:
            await self.flush()  # nobody reads again: send now, and say so if it fails
        else:
            await self._flush_quietly()  # kept buffered on failure: retried with the next read

    async def ack(self, message: InboundMessage) -> None:
        """Buffer the acknowledgement of ``message``; flush when the buffer is full."""
        if self.buffer_ack(message):
            await self.flush_due()

    def _flush_soon(self) -> None:
        self._ack_timer = None
        if self.ack_count:
            self.request_flush()

    def request_flush(self) -> None:
        """Flush buffered acknowledgements in the background: one task at a time, however many
        acknowledgements ask for it (failures are logged and retried with the next read).

        The iterator yields to the event loop before it decodes its next chunk of a read, so
        the task sends them (and gets its reply) while the rest of a large read is handled, not
        after it.
        """
        flushing = self._flushing
        if flushing is None or flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_quietly())
        self.yield_soon = True  # also while one is in flight: its reply needs the loop too

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception as exc:
            logger.warning("Flushing acknowledgements failed; retrying with the next read: %s", exc)

    def _take_acks(self) -> dict[str, list[bytes]]:
        acks: dict[str, list[bytes]] = {}
        if self.ack_count:
            acks, self.acks = self.acks, {}
            self.ack_count = 0
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        return acks

    def _restore_acks(self, acks: dict[str, list[bytes]]) -> None:
        for key, ids in acks.items():
            self.acks.setdefault(key, []).extend(ids)
            self.ack_count += len(ids)

    def _acked(self, acks: dict[str, list[bytes]]) -> None:
        self.stats.acked += sum(len(ids) for ids in acks.values())
        self.stats.ack_round_trips += 1

    async def flush(self) -> None:
        """Send every buffered acknowledgement now (one multi-id XACK per stream).

        Raises:
            redis.exceptions.RedisError: Redis did not take them; they stay buffered.
        """
        acks = self._take_acks()
        if not acks:
            return
        try:
            async with self.timeout():
                if len(acks) == 1:
                    ((key, ids),) = acks.items()
                    await self.client.xack(key, self.group, *ids)
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for key, ids in acks.items():
                        pipe.xack(key, self.group, *ids)
                    await pipe.execute()
        except BaseException:
            self._restore_acks(acks)
            raise
        self._acked(acks)

    async def release(self, message: InboundMessage) -> None:
        """Hand ``message`` back to the group for immediate redelivery (to any consumer)."""
        entry_id = self.settle(message)
        if entry_id is None:
            return
        try:
            async with self.timeout():
                await self.client.xclaim(
                    message.key,
                    self.group,
                    self.consumer,
                    0,
                    [entry_id],
                    idle=self.settings.claim_idle_ms,
                    justid=True,
                )
        except BaseException:
            self.hold(message, entry_id)
            raise
        self.stats.released += 1
        self.release_pending = True

    async def close(self) -> None:
        """Stop: flush acknowledgements, give back entries never handed out, stop keep-alive."""
        if self.closed:
            return
        self.closed = True
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        while self.undecoded:
            self.decode_more()
        waiting = list(self.waiting)
        self.waiting.clear()
        with contextlib.suppress(Exception):
            if self._flushing is not None and not self._flushing.done():
                await self._flushing
        try:
            await self.flush()
        except Exception as exc:
            logger.warning(
                "Could not send %d acknowledgement(s) on close; those entries will be "
                "delivered again: %s",
                self.ack_count,
                exc,
            )
        if waiting:
            try:
                await self._give_back(waiting)
            except Exception as exc:
                logger.debug("Could not hand back %d unread entries: %s", len(waiting), exc)

    async def _give_back(self, messages: list[InboundMessage]) -> None:
        by_key: dict[str, list[bytes]] = {}
        for message in messages:
            entry_id = self.settle(message)
            if entry_id is not None:
                by_key.setdefault(message.key, []).append(entry_id)
        for key, ids in by_key.items():
            async with self.timeout():
                await self.client.xclaim(
                    key,
                    self.group,
                    self.consumer,
                    0,
                    ids,  # type: ignore[arg-type]
                    idle=self.settings.claim_idle_ms,
                    justid=True,
                )


class RedisDeliveries:
    """The iterator of ``RedisBackend.deliveries()``: the reader's generator, plus
    :meth:`next_nowait` for what it has read and not handed out yet."""

    __slots__ = ("_messages", "next_nowait")

    def __init__(self, reader: StreamReader) -> None:
        self._messages = reader.messages()
        self.next_nowait: Callable[[], InboundMessage | None] = reader.take_nowait
        """The next delivery if one was read and is waiting, else ``None`` (no round trip):
        the reader's :meth:`StreamReader.take_nowait`, bound directly (one call per message)."""

    def __aiter__(self) -> RedisDeliveries:
        return self

    def __anext__(self) -> Awaitable[InboundMessage]:
        return self._messages.__anext__()

    async def aclose(self) -> None:
        """Close the reader: flush acknowledgements, give back what was never handed out."""
        await self._messages.aclose()
