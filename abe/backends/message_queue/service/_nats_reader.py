"""One pull consumer of the NATS JetStream backend: fetches in batches, keeps work alive.

A :class:`PullReader` backs one ``deliveries()`` (or ``consume()``) iterator. It fetches up to
``batch_size`` messages per pull request from a durable consumer, hands them out one by one,
sends buffered acknowledgements in one task per batch (an ack is a plain publish, so they
leave in the client's next write), and sends ``in_progress()`` for the messages it holds every
third of ``ack_wait`` so long work is not redelivered under a live consumer. A lost connection
is retried with backoff; the client reconnects by itself and fetching resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from abe.backends.message_queue.base.extensions import InboundMessage

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from ._nats_settings import NATSSettings

__all__ = ["LOGGER_NAME", "NATSDeliveries", "PullReader", "to_inbound"]

LOGGER_NAME = "abe.backends.message_queue.service.nats"
"""Every module of the backend logs under this name."""

logger = logging.getLogger(LOGGER_NAME)

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def _reply_fields(reply: str) -> tuple[str, int, float | None]:
    """(stream sequence, delivery count, publish time) from a JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``, or the form with
    a domain and an account hash after ``ACK``. Parsed here, once, because nats-py's
    ``metadata`` property parses it again (and builds a datetime) on every access.
    """
    tokens = reply.split(".")
    base = 2 if len(tokens) == 9 else 4
    if len(tokens) < base + 7 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(f"not a JetStream reply subject: {reply!r}")
    return tokens[base + 3], int(tokens[base + 2]), int(tokens[base + 5]) / 1e9


def to_inbound(msg: Msg, group: str, handle: Any) -> InboundMessage:
    """The :class:`InboundMessage` of one JetStream delivery."""
    sequence, delivered, published = _reply_fields(msg.reply)
    raw_headers = msg.headers
    headers: Mapping[str, str] = _NO_HEADERS
    if raw_headers:
        kept = {k: v for k, v in raw_headers.items() if not k.startswith("Nats-")}
        if kept:
            headers = kept
    body = msg.data
    payload: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        decoded = json.loads(body)
        if type(decoded) is dict:
            payload = decoded
        else:
            error = ValueError(f"the body is JSON {type(decoded).__name__}, not an object")
    except ValueError as exc:
        error = exc
    return InboundMessage(
        payload,
        msg.subject,
        sequence,
        delivered or 1,
        headers,
        published,
        group,
        body if error is not None else None,
        error,
        handle,
        len(body),
    )


class PullReader:
    """Fetches one durable consumer's messages.

    Args:
        settings: The backend's settings.
        durable: The durable consumer's name.
        prepare: Makes sure the stream and the consumer exist (awaited before the first fetch
            and after errors).
        sleep: Awaited for backoff after a failed fetch.
    """

    def __init__(
        self,
        settings: NATSSettings,
        durable: str,
        prepare: Callable[[str], Awaitable[Any]],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.durable = durable
        self._prepare = prepare
        self._sleep = sleep
        self._sub: Any = None
        self.waiting: deque[InboundMessage] = deque()
        """Fetched and not handed out yet."""
        self.held: dict[int, tuple[Msg, float]] = {}
        """Handed out or waiting and not settled: ``id(msg)`` -> (message, last sign of life)."""
        self.acks: list[Msg] = []
        self._acking: set[asyncio.Task[None]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._ahead: asyncio.Task[list[Msg]] | None = None
        """The pull request sent while the previous batch is being worked through."""
        self._refill_at = settings.batch_size // 2
        self.closed = False

    def take_nowait(self) -> InboundMessage | None:
        """The next fetched delivery if one is waiting, else ``None``.

        Once half a batch is left, the next pull request goes out in the background, so the
        round trip overlaps the work on the rest.
        """
        waiting = self.waiting
        if not waiting:
            return None
        message = waiting.popleft()
        if len(waiting) == self._refill_at and self._ahead is None and self._sub is not None:
            self._ahead = asyncio.get_running_loop().create_task(self._fetch())
        return message

    async def _fetch(self) -> list[Msg]:
        msgs: list[Msg] = await self._sub.fetch(
            self.settings.batch_size, timeout=self.settings.block
        )
        return msgs

    async def next(self) -> InboundMessage:
        """The next delivery, fetching (and waiting) when none is waiting."""
        failures = 0
        while True:
            waiting = self.waiting
            if waiting:
                message = self.take_nowait()
                assert message is not None
                return message
            if self.closed:
                raise StopAsyncIteration
            if self.acks:
                self._send_acks()
            try:
                if self._sub is None:
                    self._sub = await self._prepare(self.durable)
                    if self._keeper is None:
                        self._keeper = asyncio.get_running_loop().create_task(self._keep_alive())
                ahead, self._ahead = self._ahead, None
                msgs = await (ahead if ahead is not None else self._fetch())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _is_timeout(exc):
                    failures = 0
                    continue
                if _is_refused(exc):
                    raise
                failures += 1
                wait = min(5.0, 0.1 * 2 ** min(failures, 6))
                logger.warning(
                    "Fetching from %r failed, retrying in %.1fs: %s", self.durable, wait, exc
                )
                if failures > 2:
                    self._sub = None  # prepare again: the consumer may have to be recreated
                await self._sleep(wait)
                continue
            failures = 0
            now = time.monotonic()
            for msg in msgs:
                self.held[id(msg)] = (msg, now)
                waiting.append(to_inbound(msg, self.durable, msg))

    # -- settling --------------------------------------------------------------------------------

    def settle(self, message: InboundMessage) -> Msg:
        """Forget ``message`` as held; returns the JetStream message to settle."""
        msg: Msg = message.handle
        self.held.pop(id(msg), None)
        return msg

    def buffer_ack(self, message: InboundMessage) -> None:
        """Buffer the acknowledgement of ``message`` (sent in one task per batch)."""
        self.acks.append(self.settle(message))
        if len(self.acks) == 1:
            asyncio.get_running_loop().call_soon(self._send_acks)

    def _send_acks(self) -> None:
        msgs, self.acks = self.acks, []
        if not msgs:
            return
        task = asyncio.get_running_loop().create_task(_ack_all(msgs))
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _keep_alive(self) -> None:
        interval = self.settings.ack_wait / 3
        while not self.closed:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - interval
            for key, (msg, seen) in list(self.held.items()):
                if seen <= cutoff:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                    self.held[key] = (msg, time.monotonic())

    async def flush(self) -> None:
        """Send buffered acknowledgements and wait until the client has taken them."""
        self._send_acks()
        if self._acking:
            await asyncio.wait(set(self._acking))

    async def close(self) -> None:
        """Flush acknowledgements and stop; unsettled messages are redelivered after ack_wait
        (the ones fetched but never handed out are given back at once with a nak)."""
        if self.closed:
            return
        self.closed = True
        for task in (self._keeper, self._ahead):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(Exception):
            await self.flush()
        for message in self.waiting:
            with contextlib.suppress(Exception):
                await self.settle(message).nak()
        self.waiting.clear()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


async def _ack_all(msgs: list[Msg]) -> None:
    for msg in msgs:
        try:
            await msg.ack()
        except Exception as exc:
            logger.warning("Acknowledging a message failed (it will be redelivered): %s", exc)


def _is_timeout(exc: BaseException) -> bool:
    from nats.errors import TimeoutError as NatsTimeout

    return isinstance(exc, NatsTimeout | asyncio.TimeoutError)


def _is_refused(exc: BaseException) -> bool:
    """A request the server refuses whatever the wait (a bad name or configuration)."""
    from nats.js.errors import BadRequestError

    return isinstance(exc, BadRequestError)


class NATSDeliveries:
    """The iterator of ``NATSBackend.deliveries()``, with :meth:`next_nowait`."""

    __slots__ = ("_reader", "next_nowait")

    def __init__(self, reader: PullReader) -> None:
        self._reader = reader
        self.next_nowait: Callable[[], InboundMessage | None] = reader.take_nowait
        """The next fetched delivery if one is waiting, else ``None`` (no round trip)."""

    def __aiter__(self) -> NATSDeliveries:
        return self

    def __anext__(self) -> Awaitable[InboundMessage]:
        return self._reader.next()

    async def aclose(self) -> None:
        """Close the reader: flush acknowledgements, give back what was never handed out."""
        await self._reader.close()
