"""One consumer-group reader of the Redis Streams backend: reads, reclaims, keeps alive, acks.

A :class:`StreamReader` backs one ``deliveries()`` (or ``consume()``) iterator. It reads new
entries in batches with XREADGROUP, reclaims entries other consumers left idle with XAUTOCLAIM
(delivery counts from XPENDING), refreshes the entries it holds so live work is never reclaimed
(XCLAIM ... JUSTID), and buffers acknowledgements into one multi-id XACK per stream, sent
together with the next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from abe.backends.message_queue.base.extensions import InboundMessage

from ._redis_codec import decode_batch

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ._redis_settings import RedisSettings
    from .redis import RedisStats

__all__ = ["TRANSIENT_ERRORS", "StreamReader"]

logger = logging.getLogger("abe.backends.message_queue.service.redis")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
)
"""Errors after which reading reconnects and resumes (BusyLoadingError is a ConnectionError)."""

_KEEP_ALIVE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError)

Sleep = Callable[[float], Awaitable[None]]

_monotonic = time.monotonic


class StreamReader:
    """Reads one consumer group's entries from the configured streams.

    Args:
        client: The backend's Redis client (``decode_responses=False``).
        settings: The backend's settings.
        group: The consumer group.
        stats: Counters to update.
        sleep: Awaited for reconnection backoff.
    """

    def __init__(
        self,
        client: Redis,
        settings: RedisSettings,
        group: str,
        stats: RedisStats,
        sleep: Sleep,
    ) -> None:
        self.client = client
        self.settings = settings
        self.group = group
        self.consumer = settings.consumer
        self.stats = stats
        self._sleep = sleep
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
        self._cursors: dict[str, str] = {}
        self._next_reclaim = 0.0
        self._groups_ready = False

    # -- the iterator -------------------------------------------------------------------------

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        """Yield deliveries until cancelled or closed (the body of ``deliveries()``)."""
        waiting = self.waiting
        try:
            await self._resilient(self._ensure_groups)
            self._heartbeat = asyncio.create_task(self._keep_alive())
            while True:
                if self.release_pending:
                    await self._resilient(self._reclaim)
                if waiting:
                    yield waiting.popleft()
                    continue
                if self.closed:
                    return  # the backend was closed under us
                if _monotonic() >= self._next_reclaim:
                    await self._resilient(self._reclaim)
                    if waiting:
                        continue
                await self._resilient(self._fill)
        finally:
            await self.close()

    # -- reading ------------------------------------------------------------------------------

    def _timeout(self, extra: float = 0.0) -> asyncio.Timeout:
        return asyncio.timeout(self.settings.command_timeout + extra)

    async def _ensure_groups(self) -> None:
        for key in self.streams:
            try:
                async with self._timeout():
                    await self.client.xgroup_create(key, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    async def _fill(self) -> None:
        """Send buffered acks and read the next batch, in one round trip."""
        timeout_ms = self.settings.block_ms
        until_reclaim = self._next_reclaim - _monotonic()
        timeout_ms = max(1, min(timeout_ms, int(until_reclaim * 1000)))
        acks = self._take_acks()
        try:
            async with self._timeout(timeout_ms / 1000):
                if acks:
                    pipe = self.client.pipeline(transaction=False)
                    for key, ids in acks.items():
                        pipe.xack(key, self.group, *ids)
                    pipe.execute_command(*self._read_command(timeout_ms))
                    results = await pipe.execute()
                    response = results[-1]
                else:
                    command = self._read_command(timeout_ms)
                    response = await self.client.execute_command(*command)  # type: ignore[no-untyped-call]
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

    async def _reclaim(self) -> None:
        """Claim entries idle longer than ``claim_idle`` (crashed consumers', released ones)."""
        self.release_pending = False
        settings = self.settings
        self._next_reclaim = _monotonic() + settings.claim_idle / 2
        budget = settings.batch_size
        claimed: list[InboundMessage] = []
        for key in self.streams:
            cursor = self._cursors.get(key, "0-0")
            while budget > 0:
                async with self._timeout():
                    reply = await self.client.xautoclaim(
                        key,
                        self.group,
                        self.consumer,
                        settings.claim_idle_ms,
                        start_id=cursor,
                        count=budget,
                    )
                next_cursor = _text(reply[0])
                entries = [(i, f) for i, f in reply[1] if i is not None and f is not None]
                deleted = reply[2] if len(reply) > 2 else []
                if deleted:
                    self.stats.deleted_while_pending += len(deleted)
                    logger.warning(
                        "%d pending entries of %r were deleted from the stream (trimmed?) before "
                        "being processed: %s",
                        len(deleted),
                        key,
                        ", ".join(_text(d) for d in deleted[:10]),
                    )
                if entries:
                    counts = await self._delivery_counts(key, entries)
                    self.stats.poison += decode_batch(
                        key,
                        entries,
                        self.group,
                        self,
                        self.unsettled[key],
                        claimed.append,
                        counts,
                    )
                    budget -= len(entries)
                cursor = next_cursor
                if cursor == "0-0":
                    break
            if cursor == "0-0":
                self._cursors.pop(key, None)
            else:
                self._cursors[key] = cursor
                self._next_reclaim = 0.0  # more to scan: continue on the next turn
        if claimed:
            self.stats.reclaimed += len(claimed)
            self.stats.delivered += len(claimed)
            logger.info(
                "Reclaimed %d idle entries in group %r (crashed consumers or released deliveries)",
                len(claimed),
                self.group,
            )
            self.waiting.extendleft(reversed(claimed))

    async def _delivery_counts(self, key: str, entries: list[Any]) -> dict[bytes, int]:
        extra = len(self.unsettled[key])
        async with self._timeout():
            rows = await self.client.xpending_range(
                key,
                self.group,
                min=entries[0][0],
                max=entries[-1][0],
                count=len(entries) + extra,
                consumername=self.consumer,
            )
        result: dict[bytes, int] = {}
        for row in rows:
            entry_id = row["message_id"]
            result[entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()] = int(
                row["times_delivered"]
            )
        return result

    async def _resilient(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step``; on a lost connection wait (backoff with jitter) and try again."""
        delay = self.settings.reconnect_initial
        failures = 0
        while True:
            try:
                await step()
            except TRANSIENT_ERRORS as exc:
                failures += 1
                self.stats.reconnects += 1
                wait = delay / 2 + random.random() * delay / 2
                log = logger.warning if failures == 1 else logger.debug
                log(
                    "Redis unavailable (%s: %s); retrying in %.2fs (attempt %d)",
                    type(exc).__name__,
                    exc,
                    wait,
                    failures,
                )
                await self._sleep(wait)
                delay = min(delay * 2, self.settings.reconnect_max)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group vanished (deleted, or Redis restarted without
                # persistence): create it again and go on.
                logger.warning("Consumer group %r is missing; creating it again", self.group)
                self._groups_ready = False
                await self._ensure_groups()
                continue
            if failures:
                logger.warning("Redis reachable again after %d failed attempt(s)", failures)
            return

    # -- keeping held entries alive ---------------------------------------------------------------

    async def _keep_alive(self) -> None:
        """Reset the idle time of every entry this reader holds, every ``claim_idle / 3``."""
        interval = self.settings.claim_idle / 3
        while True:
            await asyncio.sleep(interval)
            for key, ids in self.unsettled.items():
                if not ids:
                    continue
                try:
                    async with self._timeout():
                        await self.client.xclaim(
                            key, self.group, self.consumer, 0, list(ids), justid=True
                        )
                except _KEEP_ALIVE_ERRORS as exc:
                    logger.debug("Keep-alive of held entries failed: %s", exc)

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
            async with self._timeout():
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
            async with self._timeout():
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
            async with self._timeout():
                await self.client.xclaim(
                    key,
                    self.group,
                    self.consumer,
                    0,
                    ids,  # type: ignore[arg-type]
                    idle=self.settings.claim_idle_ms,
                    justid=True,
                )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
