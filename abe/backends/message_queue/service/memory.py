"""In-process message-queue backend for development, tests and the demo.

Messages live in process memory: they are lost when the process exits and are visible only to
consumers in the same process. Instances made with ``MemoryBackend()`` or ``from_env()`` share one
queue (the published behaviour); :meth:`MemoryBackend.isolated` gives a private queue, which is what
tests and the demo use.

Besides the plain protocol the backend implements the at-least-once extensions
(:class:`~abe.backends.message_queue.base.SettlingBackend`,
:class:`~abe.backends.message_queue.base.DeadLetteringBackend`,
:class:`~abe.backends.message_queue.base.HeaderPublishingBackend`): deliveries stay *unacked*
until settled, a released delivery comes back with its delivery count raised, and
:meth:`MemoryBackend.recover` hands back what a crashed consumer left unacked. It also implements
:class:`~abe.backends.message_queue.base.DelayingBackend`: :meth:`MemoryBackend.release_later`
settles a delivery and queues it again once a timer of the backend's ``clock`` fires (the event
loop's by default; a virtual clock makes the waits virtual too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping
from typing import Any, ClassVar, Protocol, cast, overload

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.types import ConsumerGroup, MessageQueueKey, MessageQueueMessage, MessageQueuePayload

__all__ = ["MemoryBackend", "MemoryChannel", "MemoryDeliveries"]

logger = logging.getLogger(__name__)


class _Entry:
    """One queued message: ``live`` turns false when a reader takes it.

    ``rank`` is the entry's place in the one queue order: rising for messages queued at the
    back, falling (below every earlier one) for redeliveries queued at the front, so every
    queue of entries kept in that order is sorted by rank. ``seq`` is the message's own number,
    kept across redeliveries.
    """

    __slots__ = ("live", "message", "rank", "seq")

    def __init__(self, seq: int, message: InboundMessage, rank: int) -> None:
        self.seq = seq
        self.message = message
        self.rank = rank
        self.live = True


def _message(
    seq: int,
    key: MessageQueueKey,
    payload: MessageQueuePayload,
    headers: Mapping[str, str] | None,
) -> InboundMessage:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    return InboundMessage(
        payload=payload,
        key=key,
        message_id=str(seq),
        headers=dict(headers) if headers else {},
        enqueued_at=time.time(),
    )


class _Done:
    """An awaitable that is already done (what ``put((key, payload))`` returns)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


_DONE = _Done()

_COMPACT_AT = 64
"""Taken entries an :class:`_Order` may hold before it is compacted."""


class _Order:
    """The waiting messages of a set of keys (``None``: every key), in the one queue order.

    A message queued under one of the keys is added at the same end as in every other order,
    so each order is the channel's order restricted to its keys and the oldest message of the
    keys is its first live entry (what :meth:`MemoryChannel.pop_nowait` takes). A message
    taken through another order (or its key's queue) stays here, no longer live, until it
    reaches the head or the order is compacted (when taken entries outnumber the live ones), so
    each message costs the same whatever the number of keys, and an order nobody reads any
    more holds at most about twice the messages waiting under its keys.
    """

    __slots__ = ("entries", "taken")

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self.entries: deque[_Entry] = deque(entries)
        self.taken = 0
        """Entries in ``entries`` already taken elsewhere."""

    def __len__(self) -> int:
        return len(self.entries)

    def drop(self, entry: _Entry) -> None:
        """Forget ``entry``, just taken elsewhere (no longer live; it is in this order)."""
        entries = self.entries
        if entries[0] is entry:
            entries.popleft()
            return
        self.taken += 1
        while entries and not entries[0].live:  # taken entries at the head, ``entry`` among them
            entries.popleft()
            self.taken -= 1
        if self.taken > _COMPACT_AT and 2 * self.taken > len(entries):
            self.entries = deque(e for e in entries if e.live)
            self.taken = 0


class TimerClock(Protocol):
    """What :meth:`MemoryBackend.release_later` needs of a clock: timers."""

    def call_later(self, seconds: float, callback: Callable[[], object]) -> object:
        """Run ``callback`` after ``seconds``."""
        ...


class _LoopTimers:
    """Timers on the running event loop (the default :class:`TimerClock`)."""

    def call_later(self, seconds: float, callback: Callable[[], object]) -> object:
        return asyncio.get_running_loop().call_later(seconds, callback)


class MemoryChannel:
    """The store behind one or more :class:`MemoryBackend` instances.

    It is also the published ``MemoryBackend._queue``: an :class:`asyncio.Queue`-compatible
    object (``qsize()``, ``put``/``get`` of ``(key, payload)`` pairs, ``task_done()``,
    ``join()``), so code written against the published backend keeps working. Unlike
    ``asyncio.Queue`` it is not bound to an event loop, so one channel can outlive a loop.

    Every operation costs the same whatever the number of keys: messages sit in one queue order
    (publish order, redeliveries first) kept for every key (what a reader of every key takes
    from), for each key (what a reader of one named key takes from, and what ``size`` and
    ``peek`` read) and for each set of several keys that a reader has named (created by its
    first read, from the order of every key, and kept for the channel's life). Each is the
    order of every key restricted to its keys, so the oldest message of a set of keys is the
    head of that set's order and of its own key's queue; a message taken through one order is
    dropped from the others (see :class:`_Order`). Putting or taking a message touches only the
    orders of its key: every key's, its key's own and those of the named sets that hold it.
    """

    def __init__(self) -> None:
        self._order = _Order()
        self._queues: dict[str, deque[_Entry]] = {}
        self._sets: dict[frozenset[str], _Order] = {}
        """The order of each set of several keys a reader has named."""
        self._watchers: dict[str, list[_Order]] = {}
        """For each key, the orders of the named sets that hold it."""
        self._key_sets: dict[frozenset[str], frozenset[str]] = {}
        """One copy of each set of keys named by a backend (see :meth:`key_set`)."""
        self._size = 0
        self._seq = itertools.count(1)
        self._back = itertools.count(1)
        self._front = itertools.count(-1, -1)
        self._waiters: list[asyncio.Future[None]] = []
        self._unacked: dict[str, tuple[int, InboundMessage]] = {}
        self._handed_out = 0
        """Messages taken by ``get()``/``consume()`` whose ``task_done()`` is still due."""
        self._joiners: list[asyncio.Future[None]] = []

    # -- the store ----------------------------------------------------------------------------

    @overload
    def put(self, item: InboundMessage, seq: int | None = None, *, front: bool = False) -> None: ...

    @overload
    def put(self, item: tuple[MessageQueueKey, MessageQueuePayload]) -> Awaitable[None]: ...

    def put(
        self,
        item: InboundMessage | tuple[MessageQueueKey, MessageQueuePayload],
        seq: int | None = None,
        *,
        front: bool = False,
    ) -> Awaitable[None] | None:
        """Queue a message and wake the waiting consumers.

        Given an :class:`InboundMessage`, queue it (at the front when redelivering, keeping its
        sequence number ``seq``). Given a ``(key, payload)`` pair, behave as the published
        ``await _queue.put((key, payload))``: the pair is queued at once and an awaitable that
        is already done is returned.
        """
        if not isinstance(item, InboundMessage):
            self.put_nowait(item)
            return _DONE
        rank = next(self._front) if front else next(self._back)
        entry = _Entry(next(self._seq) if seq is None else seq, item, rank)
        queue = self._queues.get(item.key)
        if queue is None:
            queue = self._queues[item.key] = deque()
        if front:
            queue.appendleft(entry)
            self._order.entries.appendleft(entry)
        else:
            queue.append(entry)
            self._order.entries.append(entry)
        if self._watchers:  # the orders of the named sets that hold the key
            for order in self._watchers.get(item.key, ()):
                if front:
                    order.entries.appendleft(entry)
                else:
                    order.entries.append(entry)
        self._size += 1
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done() and not fut.get_loop().is_closed():
                    fut.set_result(None)
        return None

    def next_id(self) -> int:
        """Return the next sequence number."""
        return next(self._seq)

    def key_set(self, keys: frozenset[str]) -> frozenset[str]:
        """The channel's own copy of ``keys``: readers that pass it to :meth:`pop_nowait` find
        their set's order at once (an equal set that is another object is compared key by key).
        """
        return self._key_sets.setdefault(keys, keys)

    @overload
    def pop_nowait(
        self, keys: frozenset[str] | None, unacked: None = None
    ) -> tuple[int, InboundMessage] | None: ...

    @overload
    def pop_nowait(
        self, keys: frozenset[str] | None, unacked: dict[str, tuple[int, InboundMessage]]
    ) -> InboundMessage | None: ...

    def pop_nowait(
        self,
        keys: frozenset[str] | None,
        unacked: dict[str, tuple[int, InboundMessage]] | None = None,
    ) -> tuple[int, InboundMessage] | InboundMessage | None:
        """Remove and return the oldest message of ``keys`` (all when ``None``) with its
        sequence number, or ``None``.

        With ``unacked`` (the channel's table of deliveries handed out and not settled), the
        message is also recorded there, under its id, and returned alone: what a deliveries
        iterator hands out, in one call (:meth:`MemoryDeliveries.next_nowait`).

        The cost does not grow with the number of keys (for a set of several keys, once it is
        the channel's :meth:`key_set`); the first read of a set of several keys also makes its
        order, once, from every waiting message.
        """
        order = self._order
        source: _Order | None
        queue: deque[_Entry]
        if keys is None:
            source = order
        elif len(keys) == 1:
            source = None
            for key in keys:
                found = self._queues.get(key)
            if not found:
                return None
            queue = found
            entry = queue[0]
        else:
            source = self._sets.get(keys)
            if source is None:
                source = self._named(keys)
        if source is not None:  # the first live entry of the order of ``keys``
            entries = source.entries
            while entries:
                entry = entries.popleft()
                if entry.live:
                    break
                source.taken -= 1
            else:
                return None
            queue = self._queues[entry.message.key]
        # ``entry`` is the oldest message of some keys, so the head of its key's queue; it
        # leaves every other order that holds it: every key's and those of the named sets.
        entry.live = False
        queue.popleft()
        message = entry.message
        if not queue:
            del self._queues[message.key]
        self._size -= 1
        if source is not order:
            if order.entries[0] is entry:  # the usual case, without a call
                order.entries.popleft()
            else:
                order.drop(entry)
        sets = self._sets
        if sets and (len(sets) > 1 or source is order or source is None):
            for other in self._watchers.get(message.key, ()):  # no other set when one exists
                if other is not source:
                    other.drop(entry)
        if unacked is not None:
            unacked[message.message_id] = (entry.seq, message)  # type: ignore[index]
            return message
        return entry.seq, message

    def _named(self, keys: frozenset[str]) -> _Order:
        """The order of a set of several keys, made from the order of every key."""
        order = self._sets[keys] = _Order(
            e for e in self._order.entries if e.live and e.message.key in keys
        )
        for key in keys:
            self._watchers.setdefault(key, []).append(order)
        return order

    async def wait_pop(self, keys: frozenset[str] | None) -> tuple[int, InboundMessage]:
        """Wait for and remove the oldest message of ``keys`` (all keys when ``None``)."""
        while True:
            item = self.pop_nowait(keys)
            if item is not None:
                return item
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    def settle(
        self, message: InboundMessage, *, finished: bool = True
    ) -> tuple[int, InboundMessage] | None:
        """Forget ``message`` as unacked; returns what was tracked, if anything.

        ``finished=False`` when it is about to be queued again (a release), so :meth:`join`
        does not see a moment with nothing left.
        """
        if message.message_id is None:
            return None
        tracked = self._unacked.pop(message.message_id, None)
        if finished and tracked is not None and self._joiners:
            self._wake_joiners()
        return tracked

    def size(self, key: str | None = None) -> int:
        """Messages waiting (not handed out) under ``key``, or under all keys."""
        if key is not None:
            return len(self._queues.get(key, ()))
        return self._size

    def peek(self, key: str) -> list[InboundMessage]:
        """The messages waiting under ``key``, oldest first, without removing them."""
        return [e.message for e in self._queues.get(key, ())]

    def unacked(self) -> list[InboundMessage]:
        """Deliveries handed out and not yet acked or released."""
        return [m for _, m in self._unacked.values()]

    def recover(self) -> int:
        """Requeue every unacked delivery, as a broker does for a dead consumer."""
        items = sorted(self._unacked.values(), key=lambda item: item[0], reverse=True)
        self._unacked.clear()
        for seq, message in items:
            redelivery = dataclasses.replace(
                message, delivery_count=message.delivery_count + 1, group=None
            )
            self.put(redelivery, seq, front=True)
        return len(items)

    # -- the published ``asyncio.Queue`` face ------------------------------------------------------

    @property
    def maxsize(self) -> int:
        """Always 0: the queue is unbounded."""
        return 0

    def qsize(self) -> int:
        """Messages waiting, under every key (handed-out deliveries not counted)."""
        return self._size

    def empty(self) -> bool:
        """Whether no message is waiting."""
        return self._size == 0

    def full(self) -> bool:
        """Always ``False``: the queue is unbounded."""
        return False

    def put_nowait(self, item: tuple[MessageQueueKey, MessageQueuePayload]) -> None:
        """Queue a ``(key, payload)`` pair, as the published backend's ``publish()`` does.

        Raises:
            ValueError: the key is not a non-empty string.
            TypeError: the payload is not a dict.
        """
        key, payload = item
        seq = next(self._seq)
        self.put(_message(seq, key, payload, None), seq)

    def get_nowait(self) -> tuple[MessageQueueKey, MessageQueuePayload]:
        """Remove and return the oldest ``(key, payload)``; call :meth:`task_done` when done.

        Raises:
            asyncio.QueueEmpty: nothing is waiting.
        """
        item = self.pop_nowait(None)
        if item is None:
            raise asyncio.QueueEmpty
        self._handed_out += 1
        message = item[1]
        return message.key, message.payload

    async def get(self) -> tuple[MessageQueueKey, MessageQueuePayload]:
        """Wait for and remove the oldest ``(key, payload)``; call :meth:`task_done` when done."""
        _, message = await self.wait_pop(None)
        self._handed_out += 1
        return message.key, message.payload

    def task_done(self) -> None:
        """Mark a message taken with :meth:`get` (or yielded by ``consume()``) as processed.

        Deliveries of ``deliveries()`` count as processed once acked or dead-lettered.

        Raises:
            ValueError: called more times than messages were taken.
        """
        if self._handed_out <= 0:
            raise ValueError("task_done() called too many times")
        self._handed_out -= 1
        if self._joiners:
            self._wake_joiners()

    async def join(self) -> None:
        """Wait until every message put is processed: taken and ``task_done()``, or settled."""
        while self._unfinished():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._joiners.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._joiners.remove(fut)

    def _unfinished(self) -> int:
        return self._size + len(self._unacked) + self._handed_out

    def _wake_joiners(self) -> None:
        if self._unfinished():
            return
        joiners, self._joiners = self._joiners, []
        for fut in joiners:
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_result(None)

    @classmethod
    def adopt(cls, queue: Any) -> MemoryChannel:
        """A channel holding what a plain ``asyncio.Queue`` of ``(key, payload)`` pairs holds.

        Used when code written for the published backend assigns ``MemoryBackend._queue =
        asyncio.Queue()`` (as its tests do to start empty): the next ``MemoryBackend()``
        replaces that queue with a channel carrying its messages over.

        Raises:
            TypeError: ``queue`` is not ``asyncio.Queue``-like.
        """
        if not callable(getattr(queue, "get_nowait", None)):
            raise TypeError(
                f"MemoryBackend._queue must be a MemoryChannel or an asyncio.Queue of "
                f"(key, payload) pairs, got {type(queue).__name__}"
            )
        channel = cls()
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return channel
            channel.put_nowait(item)


class MemoryDeliveries:
    """The iterator of :meth:`MemoryBackend.deliveries`.

    ``async for`` waits for messages; ``next_nowait()`` takes one that is ready without
    waiting, or returns ``None`` (the consumer's fast path while a backlog is queued). Either
    way the delivery is recorded as unacked before it is handed out. Without a consumer group,
    ``next_nowait`` is the channel's :meth:`MemoryChannel.pop_nowait` bound to this reader's
    keys and the unacked table (one call per message, no frame of this class).
    """

    __slots__ = ("_channel", "_group", "_keys", "_unacked", "next_nowait")

    def __init__(
        self, channel: MemoryChannel, keys: frozenset[str] | None, group: ConsumerGroup
    ) -> None:
        self._channel = channel
        self._keys = keys
        self._group = group
        self._unacked = channel._unacked
        self.next_nowait: Callable[[], InboundMessage | None] = (
            # With the table, pop_nowait returns the message alone (its second overload).
            cast(
                "Callable[[], InboundMessage | None]",
                functools.partial(channel.pop_nowait, keys, channel._unacked),
            )
            if group is None
            else self._next_in_group
        )
        """The next delivery if one is queued now (recorded as unacked), else ``None``."""

    def __aiter__(self) -> MemoryDeliveries:
        return self

    async def __anext__(self) -> InboundMessage:
        item = self._channel.pop_nowait(self._keys)
        if item is None:
            item = await self._channel.wait_pop(self._keys)
        return self._track(item)

    def _next_in_group(self) -> InboundMessage | None:
        item = self._channel.pop_nowait(self._keys)
        return None if item is None else self._track(item)

    def _track(self, item: tuple[int, InboundMessage]) -> InboundMessage:
        seq, message = item
        if self._group is not None:
            message = dataclasses.replace(message, group=self._group)
        self._unacked[message.message_id] = (seq, message)  # type: ignore[index]
        return message

    async def aclose(self) -> None:
        """Nothing to release: undelivered messages stay queued."""


class MemoryBackend:
    """In-memory message-queue backend (development and tests only).

    Args:
        channel: The store to use. ``None`` means the process-wide shared store, the class
            attribute ``MemoryBackend._queue``, which is what ``MemoryBackend()`` and
            :meth:`from_env` give (the published behaviour).
        keys: Keys that :meth:`consume` and :meth:`deliveries` read. ``None`` (the default) reads
            every key, as the published backend does; naming keys keeps, for example, a
            ``<key>.dlq`` destination away from the consumer that dead-letters into it.
        clock: Timers for :meth:`release_later` (anything with ``call_later(seconds,
            callback)``, such as :class:`resilience.clock.FakeClock`); the running event loop's
            by default.

    Raises:
        TypeError: ``keys`` is a single string, or ``MemoryBackend._queue`` was replaced by
            something that is not a queue.
        ValueError: ``keys`` is empty.
    """

    _queue: ClassVar[MemoryChannel] = MemoryChannel()
    """The process-wide shared store, as published: an ``asyncio.Queue``-compatible object
    (``qsize()``, ``task_done()``, ...). Assigning a plain ``asyncio.Queue()`` to it (as tests
    of the published backend do to start empty) works too: the next ``MemoryBackend()``
    turns it into a :class:`MemoryChannel` holding the same messages."""

    def __init__(
        self,
        channel: MemoryChannel | None = None,
        *,
        keys: Iterable[MessageQueueKey] | None = None,
        clock: TimerClock | None = None,
    ) -> None:
        self.clock: TimerClock = clock if clock is not None else _LoopTimers()
        self._delayed: dict[int, InboundMessage] = {}
        if channel is None:
            channel = type(self)._shared_channel()
        self.channel = channel
        self._queue = channel  # type: ignore[misc]  # the instance's own store, as published
        if isinstance(keys, str):
            raise TypeError("keys must be an iterable of key names, not a single string")
        self.keys: frozenset[str] | None = None if keys is None else frozenset(keys)
        if self.keys is not None:
            if not self.keys:
                raise ValueError("keys must name at least one key, or be None for every key")
            self.keys = channel.key_set(self.keys)

    @classmethod
    def _shared_channel(cls) -> MemoryChannel:
        queue: Any = cls._queue
        if isinstance(queue, MemoryChannel):
            return queue
        owner = next(k for k in cls.__mro__ if "_queue" in vars(k))
        channel = MemoryChannel.adopt(queue)
        owner._queue = channel  # type: ignore[attr-defined]
        return channel

    @classmethod
    def from_env(cls) -> MemoryBackend:
        """Return a backend on the shared in-process queue (warns: development only)."""
        warnings.warn(
            "MemoryBackend is for development/testing only: messages are lost on restart "
            "and are visible only to consumers in the same process.",
            UserWarning,
            stacklevel=2,
        )
        return cls()

    @classmethod
    def isolated(
        cls, *, keys: Iterable[MessageQueueKey] | None = None, clock: TimerClock | None = None
    ) -> MemoryBackend:
        """Return a backend with a private queue of its own."""
        return cls(MemoryChannel(), keys=keys, clock=clock)

    @classmethod
    def reset_shared(cls) -> None:
        """Drop everything in the process-wide shared queue (for tests)."""
        MemoryBackend._queue = MemoryChannel()

    def view(self, *, keys: Iterable[MessageQueueKey] | None = None) -> MemoryBackend:
        """Another backend on the same store that reads ``keys`` (same clock)."""
        return MemoryBackend(self.channel, keys=keys, clock=self.clock)

    # -- plain protocol ------------------------------------------------------------------------

    async def publish(self, key: MessageQueueKey, payload: MessageQueuePayload) -> None:
        """Queue ``payload`` under ``key``."""
        await self.publish_message(key, payload)

    async def consume(self, *, group: ConsumerGroup = None) -> AsyncIterator[MessageQueueMessage]:
        """Yield payloads in publish order until cancelled (at-most-once; ``group`` ignored)."""
        channel = self.channel
        keys = self.keys
        while True:
            item = channel.pop_nowait(keys)
            _, message = item if item is not None else await channel.wait_pop(keys)
            # As published: the message counts as processed (task_done) once it is handed out.
            channel._handed_out += 1
            try:
                channel.task_done()
            except ValueError:
                logger.warning(
                    "task_done() called too many times - this may indicate a queue accounting issue"
                )
            yield message.payload

    # -- extensions -----------------------------------------------------------------------------

    async def publish_message(
        self,
        key: MessageQueueKey,
        payload: MessageQueuePayload,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> str | None:
        """Queue ``payload`` with ``headers``; returns the message id.

        Raises:
            ValueError: ``key`` is not a non-empty string.
            TypeError: ``payload`` is not a dict.
        """
        seq = self.channel.next_id()
        message = _message(seq, key, payload, headers)
        self.channel.put(message, seq)
        return message.message_id

    def deliveries(self, *, group: ConsumerGroup = None) -> MemoryDeliveries:
        """Deliveries that stay unacked until :meth:`ack` or :meth:`release`, in publish order,
        until cancelled (the iterator also offers ``next_nowait()``)."""
        return MemoryDeliveries(self.channel, self.keys, group)

    async def ack(self, message: InboundMessage) -> None:
        """Settle ``message`` as done."""
        self.channel.settle(message)

    def ack_nowait(self, message: InboundMessage) -> None:
        """:meth:`ack` without a coroutine (the in-memory ack is synchronous anyway)."""
        channel = self.channel
        channel._unacked.pop(message.message_id, None)  # type: ignore[arg-type]
        if channel._joiners:
            channel._wake_joiners()

    async def release(self, message: InboundMessage) -> None:
        """Give ``message`` back: it is redelivered first, with its delivery count raised."""
        tracked = self.channel.settle(message, finished=False)
        if tracked is None:
            return
        seq, _ = tracked
        redelivery = dataclasses.replace(
            message, delivery_count=message.delivery_count + 1, group=None
        )
        self.channel.put(redelivery, seq, front=True)

    async def release_later(self, message: InboundMessage, delay: float) -> None:
        """Settle ``message`` and queue it again, delivery count raised, after ``delay`` seconds
        on the backend's clock (at the back of its key's queue, like a new message).

        Waiting messages live in this process only (see :meth:`delayed`): like every message of
        this backend they are lost if the process exits.

        Raises:
            ValueError: ``delay`` is negative or not finite.
        """
        if not (isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
        tracked = self.channel.settle(message, finished=False)
        if tracked is None and message.message_id is not None:
            return  # already settled: another release_later or ack got there first
        seq = self.channel.next_id()
        redelivery = dataclasses.replace(
            message,
            delivery_count=message.delivery_count + 1,
            group=None,
            headers=dict(message.headers),
        )
        self._delayed[seq] = redelivery

        def due() -> None:
            ready = self._delayed.pop(seq, None)
            if ready is not None:
                self.channel.put(ready, seq)

        self.clock.call_later(float(delay), due)

    def delayed(self) -> list[InboundMessage]:
        """Messages :meth:`release_later` holds until their delay is over."""
        return list(self._delayed.values())

    async def dead_letter(
        self,
        message: InboundMessage,
        destination: MessageQueueKey,
        record: Mapping[str, Any],
    ) -> str | None:
        """Queue ``record`` under ``destination`` and ack ``message`` in one step."""
        record_id = await self.publish_message(destination, dict(record))
        self.channel.settle(message)
        return record_id

    # -- introspection ---------------------------------------------------------------------------

    def size(self, key: MessageQueueKey | None = None) -> int:
        """Messages waiting under ``key`` (or all keys), not counting unacked deliveries."""
        return self.channel.size(key)

    def peek(self, key: MessageQueueKey) -> list[InboundMessage]:
        """Messages waiting under ``key``, oldest first."""
        return self.channel.peek(key)

    def unacked(self) -> list[InboundMessage]:
        """Deliveries handed out and not yet settled."""
        return self.channel.unacked()

    def recover(self) -> int:
        """Requeue all unacked deliveries (what a broker does when a consumer dies)."""
        return self.channel.recover()
