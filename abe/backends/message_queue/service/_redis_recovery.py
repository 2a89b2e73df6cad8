"""Recovery duties of a stream reader: reclaim idle entries, keep held ones alive, reconnect.

* :func:`reclaim` takes over entries idle longer than ``claim_idle`` (their consumer crashed,
  stalled, or released them) with XAUTOCLAIM, reading their delivery counts from XPENDING.
* :func:`keep_alive` resets the idle time of the entries a live reader holds (XCLAIM ... JUSTID)
  so slow work is never reclaimed from under it.
* :func:`resilient` runs a reader step, waiting with jittered exponential backoff while Redis
  is unreachable and recreating a consumer group that vanished.

Both re-raise a cancellation that a Redis call swallowed. On Python 3.11 a client with a
``socket_timeout`` (redis-py's default is 5 s, so any client a user passes in) sends every
command through ``asyncio.wait_for``, which loses a cancellation that arrives as the send
completes; the read would then go on as if nothing happened and ``shutdown()`` would wait out
its whole drain timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from redis.exceptions import ResponseError

from ._redis_codec import decode_batch
from ._redis_common import (
    LOGGER_NAME,
    REFUSED_ERRORS,
    TRANSIENT_ERRORS,
    RedisBackendError,
    text,
)
from ._redis_delay import select_streams
from ._redis_settings import redact

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from abe.backends.message_queue.base.connection import ConnectionStatus
    from abe.backends.message_queue.base.extensions import InboundMessage

    from ._redis_common import RedisStats, Sleep
    from ._redis_settings import RedisSettings

__all__ = [
    "IDLE_STREAMS_LUA",
    "RecoverableReader",
    "keep_alive",
    "raise_if_cancel_swallowed",
    "reclaim",
    "resilient",
    "unswallowed",
]

logger = logging.getLogger(LOGGER_NAME)


class RecoverableReader(Protocol):
    """What the recovery duties use of a stream reader
    (:class:`._redis_reader.StreamReader` has all of it; this module does not import it)."""

    client: Redis
    settings: RedisSettings
    group: str
    consumer: str
    stats: RedisStats
    sleep: Sleep
    connection: ConnectionStatus
    streams: list[str]
    unsettled: dict[str, dict[str, bytes]]
    waiting: deque[InboundMessage]
    cursors: dict[str, str]
    next_reclaim: float
    release_pending: bool
    groups_ready: bool
    owner: asyncio.Task[Any] | None
    cancel_baseline: int

    def timeout(self, extra: float = 0.0) -> asyncio.Timeout:
        """A deadline for one Redis call."""
        ...

    def idle_script(self) -> Any:
        """:data:`IDLE_STREAMS_LUA`, registered with :attr:`client`."""
        ...

    async def ensure_groups(self) -> None:
        """Create the consumer group on every stream."""
        ...


IDLE_STREAMS_LUA = """
local found = {}
for i, key in ipairs(KEYS) do
  local rows = redis.pcall('XPENDING', key, ARGV[1], 'IDLE', ARGV[2], '-', '+', 1)
  if type(rows) ~= 'table' or rows.err or #rows > 0 then
    found[#found + 1] = i
  end
end
return found
"""
"""Of the streams KEYS, the positions (1-based) of those where group ARGV[1] has an entry
pending for at least ARGV[2] ms (the ones XAUTOCLAIM would claim something from), and of those
where the check failed (a missing group: XAUTOCLAIM then reports the error itself)."""


_KEEP_ALIVE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError)

_RECANCEL_EVERY = 0.005
"""Seconds between cancellations of a guarded call that swallowed the previous one."""

T = TypeVar("T")


def raise_if_cancel_swallowed(task: asyncio.Task[Any] | None, baseline: int) -> None:
    """Raise ``CancelledError`` when ``task`` was cancelled and the error never reached it.

    A call that returns normally while the task's cancellation count rose above ``baseline``
    (its value before the call) swallowed the cancellation, as ``asyncio.wait_for`` can on
    Python 3.11.

    Raises:
        asyncio.CancelledError: the cancellation was swallowed.
    """
    if task is not None and task.cancelling() > baseline:
        raise asyncio.CancelledError


async def unswallowed(call: Awaitable[T]) -> T:
    """Await ``call`` in a task of its own, so that cancelling the caller always works.

    When the caller is cancelled it gets ``CancelledError`` at once; ``call`` is cancelled
    again and again until it ends, so a cancellation its ``asyncio.wait_for`` swallowed in the
    send is repeated in the (blocking) read that follows.

    Raises:
        asyncio.CancelledError: the caller was cancelled.
    """
    inner = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        try:
            while not inner.done():
                inner.cancel()
                await asyncio.wait({inner}, timeout=_RECANCEL_EVERY)
        finally:
            if inner.done() and not inner.cancelled():
                inner.exception()  # retrieved: the caller is going away either way
            else:
                inner.cancel()
        raise


async def reclaim(reader: RecoverableReader) -> None:
    """Claim entries idle longer than ``claim_idle`` for ``reader``: up to ``batch_size`` per
    stream, every stream in one pipelined round trip (one more for the delivery counts).

    A first round trip (one script per :data:`~._redis_delay.STREAMS_PER_SCRIPT` streams) finds
    the streams with an entry idle that long; only those (and those whose last scan stopped
    early) are sent an XAUTOCLAIM, so a reclaim with nothing to take costs one command, not one
    per stream.

    Claimed entries go to the front of the reader's queue, with their delivery counts. A stream
    whose scan stops early (its count is spent) goes on from its cursor on the next turn.
    """
    reader.release_pending = False
    settings = reader.settings
    stats = reader.stats
    reader.next_reclaim = time.monotonic() + settings.claim_idle / 2
    keys = await _idle_streams(reader)
    if not keys:
        return
    pipe = reader.client.pipeline(transaction=False)
    for key in keys:
        pipe.xautoclaim(
            key,
            reader.group,
            reader.consumer,
            settings.claim_idle_ms,
            start_id=reader.cursors.get(key, "0-0"),
            count=settings.batch_size,
        )
    async with reader.timeout():
        replies = await pipe.execute()
    found: list[tuple[str, list[Any]]] = []
    for key, reply in zip(keys, replies, strict=True):
        entries = [(i, f) for i, f in reply[1] if i is not None and f is not None]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:
            stats.deleted_while_pending += len(deleted)
            logger.warning(
                "%d pending entries of %r were deleted from the stream (trimmed?) before "
                "being processed: %s",
                len(deleted),
                key,
                ", ".join(text(d) for d in deleted[:10]),
            )
        if entries:
            found.append((key, entries))
        cursor = text(reply[0])
        if cursor == "0-0":
            reader.cursors.pop(key, None)
        else:
            reader.cursors[key] = cursor
            reader.next_reclaim = 0.0  # more to scan: go on at the next turn
    if not found:
        return
    counts = await _delivery_counts(reader, found)
    claimed: list[InboundMessage] = []
    for key, entries in found:
        stats.poison += decode_batch(
            key,
            entries,
            reader.group,
            reader,
            reader.unsettled.setdefault(key, {}),
            claimed.append,
            counts[key],
        )
    if claimed:
        stats.reclaimed += len(claimed)
        stats.delivered += len(claimed)
        logger.info(
            "Reclaimed %d idle entries in group %r (crashed or stalled consumers, releases)",
            len(claimed),
            reader.group,
        )
        reader.waiting.extendleft(reversed(claimed))


async def _idle_streams(reader: RecoverableReader) -> list[str]:
    """The streams of ``reader`` to reclaim on: an entry idle for ``claim_idle`` or more, the
    check refused (XAUTOCLAIM says why), or a scan to go on from its cursor."""
    streams = reader.streams
    if not streams:
        return []
    args = (reader.group, reader.settings.claim_idle_ms)

    def call(chunk: Sequence[str]) -> tuple[Sequence[Any], Sequence[Any]]:
        return chunk, args

    async with reader.timeout():
        idle = await select_streams(reader.client, reader.idle_script(), streams, call)
    found = {*idle, *reader.cursors}
    return [key for key in streams if key in found]


async def _delivery_counts(
    reader: RecoverableReader, found: list[tuple[str, list[Any]]]
) -> dict[str, dict[bytes, int]]:
    """Delivery counts of entries just claimed by ``reader`` (per stream) from the pending
    lists, all streams in one pipelined round trip."""
    pipe = reader.client.pipeline(transaction=False)
    for key, entries in found:
        pipe.xpending_range(
            key,
            reader.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) + len(reader.unsettled.get(key, ())),
            consumername=reader.consumer,
        )
    async with reader.timeout():
        replies = await pipe.execute()
    counts: dict[str, dict[bytes, int]] = {}
    for (key, _), rows in zip(found, replies, strict=True):
        per_entry = counts[key] = {}
        for row in rows:
            entry_id = row["message_id"]
            if not isinstance(entry_id, bytes):
                entry_id = str(entry_id).encode()
            per_entry[entry_id] = int(row["times_delivered"])
    return counts


async def keep_alive(reader: RecoverableReader) -> None:
    """Reset the idle time of every entry ``reader`` holds, every ``claim_idle / 3``, forever."""
    interval = reader.settings.claim_idle / 3
    task = asyncio.current_task()
    while True:
        await asyncio.sleep(interval)
        held = {key: list(ids.values()) for key, ids in reader.unsettled.items() if ids}
        if held:
            pipe = reader.client.pipeline(transaction=False)
            for key, ids in held.items():  # every stream in one round trip
                pipe.xclaim(key, reader.group, reader.consumer, 0, ids, justid=True)  # type: ignore[arg-type]
            try:
                async with reader.timeout():
                    await pipe.execute(raise_on_error=False)
            except _KEEP_ALIVE_ERRORS as exc:
                count = sum(len(ids) for ids in held.values())
                logger.debug("Keep-alive of %d held entries failed: %s", count, exc)
        raise_if_cancel_swallowed(task, 0)  # close() cancels this task and waits for it


async def resilient(reader: RecoverableReader, step: Callable[[], Awaitable[None]]) -> None:
    """Run ``step`` for ``reader`` until it succeeds.

    While Redis is unreachable, wait with jittered exponential backoff (``reconnect_initial``
    doubling up to ``reconnect_max``; each wait is between half and all of the current delay)
    and count every failed attempt in ``stats.reconnects`` and ``reader.connection`` (which
    says when a failure is worth a warning). A missing consumer group (the
    stream was deleted, or Redis restarted without persistence) is created again.

    Raises:
        RedisBackendError: Redis refused the credentials or the user's rights.
        redis.exceptions.ResponseError: Redis refused the step for another reason.
        asyncio.CancelledError: the task was cancelled, also when a Redis call swallowed it.
    """
    task = asyncio.current_task()
    if task is not None and task is reader.owner:
        baseline = reader.cancel_baseline  # also catches a cancellation lost between steps
    else:
        baseline = task.cancelling() if task is not None else 0
    settings = reader.settings
    delay = settings.reconnect_initial
    while True:
        try:
            if not reader.groups_ready:
                await reader.ensure_groups()
            await step()
        except TRANSIENT_ERRORS as exc:
            raise_if_cancel_swallowed(task, baseline)
            if isinstance(exc, REFUSED_ERRORS):
                raise RedisBackendError(
                    f"Redis at {redact(settings.url)} refused the connection "
                    f"({type(exc).__name__}: {exc}); check the password (REDIS_URL or "
                    "REDIS_PASSWORD) and the user's permissions"
                ) from exc
            reader.stats.reconnects += 1
            wait = delay / 2 + random.random() * delay / 2
            connection = reader.connection
            log = logger.warning if connection.failed(exc) else logger.debug
            log(
                "Redis at %s unavailable for %.1fs (attempt %d): %s: %s; retrying in %.2fs",
                redact(settings.url),
                connection.down_for,
                connection.attempts,
                type(exc).__name__,
                exc,
                wait,
            )
            await reader.sleep(wait)
            delay = min(delay * 2, settings.reconnect_max)
            continue
        except ResponseError as exc:
            raise_if_cancel_swallowed(task, baseline)
            if "NOGROUP" not in str(exc) or not reader.groups_ready:
                raise  # refused, or missing again right after being created: give up
            logger.warning("Consumer group %r is missing; creating it again", reader.group)
            reader.groups_ready = False
            continue
        raise_if_cancel_swallowed(task, baseline)
        connection = reader.connection
        if connection.attempts:
            logger.warning(
                "Redis reachable again after %d failed attempt(s) in %.1fs",
                connection.attempts,
                connection.down_for,
            )
        connection.succeeded()
        return
