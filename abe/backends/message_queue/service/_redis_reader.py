"""One consumer-group reader of the Redis Streams backend: reads in batches, settles, acks.

A :class:`StreamReader` backs one ``deliveries()`` (or ``consume()``) iterator. It reads new
entries in batches with XREADGROUP and buffers acknowledgements into one multi-id XACK per
stream, sent together with the next read (or after ``ack_delay``, or when ``ack_batch`` are
waiting). Reclaiming idle entries, keeping held ones alive and reconnecting live in
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
from ._redis_common import LOGGER_NAME, RedisStats, Sleep
from ._redis_recovery import keep_alive, reclaim, resilient, unswallowed

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ._redis_settings import RedisSettings

__all__ = ["RedisDeliveries", "StreamReader"]

logger = logging.getLogger(LOGGER_NAME)

_monotonic = time.monotonic


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
        self.streams = settings.streams
        self._key_of = {key.encode(): key for key in self.streams}
        self._read_ids: dict[str, str] = dict.fromkeys(self.streams, ">")
        self.unsettled: dict[str, dict[str, bytes]] = {key: {} for key in self.streams}
        """Per stream: ids (str -> bytes) read by this reader and neither acked nor released."""
        self.waiting: deque[InboundMessage] = deque()
        """Read (or reclaimed) and not yet handed out."""
        self.acks: dict[str, list[bytes]] = {key: [] for key in self.streams}
        """Per stream: entry ids whose acknowledgement is buffered."""
        self._ack_limit = settings.ack_limit
        self.ack_count = 0
        self.release_pending = False
        self.closed = False
        self._ack_timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.cursors: dict[str, str] = {}
        """Per stream: where an unfinished reclaim scan goes on."""
        self.next_reclaim = 0.0
        """Monotonic time of the next reclaim scan (the first one runs at start)."""
        self.groups_ready = False
        self.owner: asyncio.Task[Any] | None = None
        """The task iterating :meth:`messages` (set when it starts)."""
        self.cancel_baseline = 0
        """:attr:`owner`'s ``cancelling()`` when it started: more means a lost cancellation."""
        self._guard_reads = guard_reads
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
                if self.release_pending:
                    await resilient(self, self._reclaim)
                if waiting:
                    yield waiting.popleft()
                    continue
                if self.closed:
                    return  # the backend was closed under us
                if _monotonic() >= self.next_reclaim:
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
        if self.owner is None or self.release_pending or self.closed or not self.waiting:
            return None
        return self.waiting.popleft()

    # -- reading ------------------------------------------------------------------------------

    def timeout(self, extra: float = 0.0) -> asyncio.Timeout:
        """A deadline of ``command_timeout`` (plus ``extra``) seconds for one Redis call."""
        return asyncio.timeout(self.settings.command_timeout + extra)

    async def ensure_groups(self) -> None:
        """Create the consumer group on every stream (at the start, creating the stream)."""
        for key in self.streams:
            try:
                async with self.timeout():
                    await self.client.xgroup_create(key, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self.groups_ready = True

    async def _reclaim(self) -> None:
        await reclaim(self)

    async def _fill(self) -> None:
        """Send buffered acks and read the next batch, in one round trip."""
        timeout_ms = self.settings.block_ms
        until_reclaim = self.next_reclaim - _monotonic()
        timeout_ms = max(1, min(timeout_ms, int(until_reclaim * 1000)))
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
        waiting = self.waiting
        before = len(waiting)
        poison = 0
        for stream, entries in response:
            key = self._key_of.get(stream) or stream.decode()
            poison += decode_batch(
                key, entries, self.group, self, self.unsettled[key], waiting.append
            )
        stats = self.stats
        stats.delivered += len(waiting) - before
        if poison:
            stats.poison += poison

    def _read_command(self, timeout_ms: int) -> list[Any]:
        streams = self._read_ids
        return [
            "XREADGROUP",
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
        try:
            entry_id = self.unsettled[message.key].pop(message.message_id)  # type: ignore[arg-type]
        except KeyError:
            return False  # settled already (dead-lettered, released, or acked twice)
        self.acks[message.key].append(entry_id)
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
        if self.ack_count and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.create_task(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception as exc:
            logger.warning("Flushing acknowledgements failed; retrying with the next read: %s", exc)

    def _take_acks(self) -> dict[str, list[bytes]]:
        acks: dict[str, list[bytes]] = {}
        if self.ack_count:
            acks = {key: ids for key, ids in self.acks.items() if ids}
            self.acks = {key: [] for key in self.streams}
            self.ack_count = 0
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        return acks

    def _restore_acks(self, acks: dict[str, list[bytes]]) -> None:
        for key, ids in acks.items():
            self.acks[key].extend(ids)
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
