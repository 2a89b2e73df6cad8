"""One pull consumer of the NATS JetStream backend: fetches in batches, keeps work alive.

A :class:`PullReader` backs one ``deliveries()`` (or ``consume()``) iterator. It asks a durable
consumer for up to ``batch_size`` messages per pull request, receives them on its own inbox
subscription as they arrive, hands them out one by one,
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
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from ._nats_settings import NATSSettings

__all__ = ["LOGGER_NAME", "NATSDeliveries", "PullReader", "to_inbound"]

LOGGER_NAME = "abe.backends.message_queue.service.nats"
"""Every module of the backend logs under this name."""

logger = logging.getLogger(LOGGER_NAME)

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

_GRACE = 1.0
"""Seconds past a pull request's expiry after which the reader sends another without word."""

_dumps = json.JSONEncoder(separators=(",", ":")).encode


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
    # Most messages carry only the publisher's Nats-Msg-Id: skip building a dict for them.
    if raw_headers and (len(raw_headers) > 1 or "Nats-Msg-Id" not in raw_headers):
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

    The reader sends JetStream pull requests (``CONSUMER.MSG.NEXT``) itself, with its own inbox
    subscription as the reply subject, and a callback on that subscription turns each delivery
    into an :class:`InboundMessage` as it arrives. One pull request is open at a time; the next
    one goes out once the open one is complete and at most half a batch is waiting, so the round
    trip overlaps the work on the rest. (nats-py's ``fetch()`` would wait for whole batches and
    start a task and a timer for every message.)

    Args:
        settings: The backend's settings.
        durable: The durable consumer's name.
        prepare: Makes sure the stream and the consumer exist and returns the connection and the
            subject pull requests go to (awaited before the first request and after errors).
        sleep: Awaited for backoff after a failed request.
    """

    def __init__(
        self,
        settings: NATSSettings,
        durable: str,
        prepare: Callable[[str], Awaitable[tuple[Client, str]]],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.durable = durable
        self._prepare = prepare
        self._sleep = sleep
        self._nc: Client | None = None
        self._sub: Subscription | None = None
        self._inbox = ""
        self._next_subject = ""
        self.waiting: deque[InboundMessage] = deque()
        """Fetched and not handed out yet."""
        self.held: dict[int, tuple[Msg, float]] = {}
        """Handed out or waiting and not settled: ``id(msg)`` -> (message, last sign of life)."""
        self.acks: list[Msg] = []
        self._acking: set[asyncio.Task[None]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._owed = 0
        """Messages the open pull request may still deliver (0 or less: none is open)."""
        self._expires_at = 0.0
        """When the open pull request is given up without word from the server."""
        self._request = _dumps(
            {"batch": settings.batch_size, "expires": int(settings.block * 1e9)}
        ).encode()
        self._refill_at = settings.batch_size // 2
        self._wakeup: asyncio.Future[None] | None = None
        self._failure: Exception | None = None
        self.closed = False

    def take_nowait(self) -> InboundMessage | None:
        """The next fetched delivery if one is waiting, else ``None``."""
        waiting = self.waiting
        if not waiting:
            return None
        message = waiting.popleft()
        if self._owed <= 0 and len(waiting) <= self._refill_at:
            self._pull()
        return message

    def _pull(self) -> None:
        """Send the next pull request unless one is open (or the reader is not subscribed)."""
        nc = self._nc
        if self._owed > 0 or nc is None or self._sub is None or self.closed:
            return
        self._owed = self.settings.batch_size
        # The server answers within ``block`` (408 when it expires); the grace covers the
        # answer lost with a connection.
        self._expires_at = time.monotonic() + self.settings.block + _GRACE
        task = asyncio.get_running_loop().create_task(self._send_pull(nc))
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def _send_pull(self, nc: Client) -> None:
        try:
            await nc.publish(self._next_subject, self._request, reply=self._inbox)
        except Exception as exc:
            self._owed = 0
            self._fail(exc)

    async def _on_msg(self, msg: Msg) -> None:
        """The inbox subscription's callback: a delivery or the server's word on a request."""
        if msg.reply:
            self._owed -= 1
            if self.closed:
                with contextlib.suppress(Exception):
                    await msg.nak()
                return
            self.held[id(msg)] = (msg, time.monotonic())
            self.waiting.append(to_inbound(msg, self.durable, msg))
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(None)
            return
        status = (msg.headers or {}).get("Status", "")
        if status == "100":  # a heartbeat (not asked for)
            return
        self._owed = 0  # the open request is over
        if status not in ("404", "408"):  # 404/408: no more messages within the request
            from nats.js.errors import APIError

            # 409: refused (the consumer was deleted, its leader changed...); 503: no such
            # consumer. Retried with backoff, and prepared again after repeated failures.
            try:
                APIError.from_msg(msg)  # raises the error the status stands for
            except Exception as exc:
                self._fail(exc)
            return
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._failure = exc
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _start(self) -> None:
        nc, self._next_subject = await self._prepare(self.durable)
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self._on_msg)
        self._nc = nc
        self._owed = 0
        if self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep_alive())

    async def _stop_subscription(self) -> None:
        sub, self._sub = self._sub, None
        self._owed = 0
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def next(self) -> InboundMessage:
        """The next delivery, fetching (and waiting) when none is waiting."""
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            if self.waiting:
                message = self.take_nowait()
                assert message is not None
                return message
            if self.closed:
                raise StopAsyncIteration
            if self.acks:
                self._send_acks()
            failure, self._failure = self._failure, None
            try:
                if failure is not None:
                    raise failure
                if self._sub is None:
                    await self._start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _is_refused(exc):
                    raise
                failures += 1
                wait = min(5.0, 0.1 * 2 ** min(failures, 6))
                logger.warning(
                    "Fetching from %r failed, retrying in %.1fs: %s", self.durable, wait, exc
                )
                if failures > 2:  # prepare again: the consumer may have to be recreated
                    await self._stop_subscription()
                await self._sleep(wait)
                continue
            self._pull()
            if self.waiting or self._failure is not None:
                continue
            wakeup = self._wakeup = loop.create_future()
            try:
                await asyncio.wait_for(wakeup, max(0.0, self._expires_at - time.monotonic()))
            except TimeoutError:
                # The server answers every request by its expiry: silence means the request
                # was lost with the connection or the consumer is gone. Send another (after
                # backoff; repeated silence prepares the consumer again).
                self._owed = 0
                self._failure = TimeoutError(
                    f"no answer to a pull request within {self.settings.block + _GRACE:.1f}s"
                )
            finally:
                self._wakeup = None
            if self._failure is None:
                failures = 0

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
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
        await self._stop_subscription()
        with contextlib.suppress(Exception):
            await self.flush()
        for message in self.waiting:
            with contextlib.suppress(Exception):
                await self.settle(message).nak()
        self.waiting.clear()


async def _ack_all(msgs: list[Msg]) -> None:
    for msg in msgs:
        try:
            await msg.ack()
        except Exception as exc:
            logger.warning("Acknowledging a message failed (it will be redelivered): %s", exc)


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
