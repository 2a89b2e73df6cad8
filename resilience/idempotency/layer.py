"""The idempotency layer: a message's effects happen once although it is delivered at least once.

Per delivery: work out the message's identity, claim it in the store with a lease, run the rest
of the pipeline, then write a completion record (kept for a TTL). A delivery whose identity has
a completion record is acknowledged without running the handler (outcome ``duplicate``); one
claimed by another consumer waits for that consumer, up to ``wait`` seconds, and is then given
back to the broker; a failure drops the claim so that a retry or a redelivery can run. When the
store itself fails (it is down), the delivery is given back unacknowledged after a backoff
(:class:`StoreUnavailable`): the handler's retries are not spent and nothing is dead-lettered
because of the store.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from ..backoff import store_failure_wait, wait_after
from ..clock import Clock, default_clock
from ..errors import ConfigError, Unsettled
from ..events import Outcome
from ._store import ClaimState, IdempotencyStore, InProgressElsewhere, StoreUnavailable

if TYPE_CHECKING:
    from ..delivery import Delivery
    from ..types import CallNext

__all__ = [
    "DEFAULT_HEADER",
    "STORE_FAILURE_BACKOFF",
    "Idempotency",
    "KeyFunction",
    "current_transaction",
]

logger = logging.getLogger(__name__)

KeyFunction = Callable[["Delivery"], "str | None"]
"""Gives a delivery's identity (``None``: the message has none)."""

DEFAULT_HEADER = "idempotency-key"
"""The header producers conventionally put their own message id in."""

STORE_FAILURE_BACKOFF = 5.0
"""The longest wait, in seconds, before a delivery whose store operation failed is given back
(the waits grow with consecutive failures of the store: no hot loop of redeliveries)."""

_STORE_WAIT = store_failure_wait(STORE_FAILURE_BACKOFF)

MAX_GIVEN_BACK = 1024
"""Messages whose give-backs a layer remembers at most (the least recently given back are
forgotten first)."""


class _NotCompleted(Exception):
    """Leaves the store's completion context without a record (a deferred message)."""


_TRANSACTION: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "resilience_idempotency_transaction", default=None
)


def current_transaction() -> Any:
    """The store's transaction for the message being handled, for the handler's own effects.

    With :class:`~resilience.idempotency.PostgresStore` it is the open ``psycopg``
    ``AsyncConnection``: statements the handler runs on it commit together with the completion
    record, or not at all. With :class:`~resilience.idempotency.RedisStore` it is a
    :class:`~resilience.idempotency.RedisEffects` whose commands run in the same Lua script
    as the completion record. ``None`` with stores that have no transaction, or outside a
    handler run by the :class:`Idempotency` layer.

    Returns:
        The transaction object, or ``None``.
    """
    return _TRANSACTION.get()


def _seconds(value: float | timedelta, name: str, *, positive: bool = True) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds != seconds:
        raise ConfigError(f"idempotency.{name} must be a number of seconds, got {value!r}")
    if seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"idempotency.{name} must be {bound} seconds, got {value!r}")
    return float(seconds)


class Idempotency:
    """Middleware that runs each message's handler once per identity.

    Put it inside dead-letter routing and outside retry (``Policy`` does): a message that is
    dead-lettered was not completed, so a replay of it runs again.

    Args:
        store: Where claims and completion records live.
        key: A function giving a delivery's identity (overrides ``header``).
        header: Read the identity from this transport header (for example
            ``"idempotency-key"``), for producer-assigned ids that survive replay and re-publish.
            Without ``key`` and ``header`` the identity is the broker's message id.
        lease: Seconds a claim lasts; longer than the longest the handler may take (with its
            retries), or another consumer may take the message over while it runs.
        ttl: Seconds a completion record is kept; duplicates arriving later run again.
        wait: Seconds a delivery whose message another consumer is processing waits for it
            to finish before being given back to the broker (0: give it back at once).
        poll: Seconds between looks at a claim held elsewhere while waiting.
        namespace: Prefix of every key in the store (separate consumers sharing a store).
        clock: Time source for the waits (the event loop's by default).

    Raises:
        ConfigError: an argument is out of range or of the wrong type.
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_given_back",
        "_header",
        "_key",
        "_lease",
        "_namespace",
        "_poll",
        "_store",
        "_ttl",
        "_wait",
        "_warned",
    )

    def __init__(
        self,
        store: IdempotencyStore,
        *,
        key: KeyFunction | None = None,
        header: str | None = None,
        lease: float | timedelta = 60.0,
        ttl: float | timedelta = timedelta(days=1),
        wait: float | timedelta = 5.0,
        poll: float | timedelta = 0.05,
        namespace: str = "",
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(store, IdempotencyStore):
            raise ConfigError(f"idempotency store must offer claim/complete/release, got {store!r}")
        if key is not None and not callable(key):
            raise ConfigError(f"idempotency.key must be a function of the delivery, got {key!r}")
        if header is not None and (not isinstance(header, str) or not header):
            raise ConfigError(f"idempotency.header must be a non-empty string, got {header!r}")
        if not isinstance(namespace, str):
            raise ConfigError(f"idempotency.namespace must be a string, got {namespace!r}")
        self._store = store
        self._key = key
        self._header = header
        self._lease = _seconds(lease, "lease")
        self._ttl = _seconds(ttl, "ttl")
        self._wait = _seconds(wait, "wait", positive=False)
        self._poll = _seconds(poll, "poll")
        self._namespace = namespace
        self._clock: Clock = clock or default_clock
        self._warned = False
        self._failures = 0
        self._given_back: OrderedDict[str, int] = OrderedDict()

    @property
    def store(self) -> IdempotencyStore:
        """The store."""
        return self._store

    def identity(self, delivery: Delivery) -> str | None:
        """The message's identity, as stored (namespace included); ``None`` when it has none.

        Args:
            delivery: The delivery.

        Returns:
            The store key, or ``None``.
        """
        if self._key is not None:
            value = self._key(delivery)
        elif self._header is not None:
            value = delivery.headers.get(self._header)
        else:
            value = delivery.message_id
            if value is not None and delivery.key:
                value = f"{delivery.key}/{value}"  # broker ids are unique per stream/queue
        if not value:
            return None
        return f"{self._namespace}{value}"

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        """Run ``call_next`` unless the message was completed before (see the class)."""
        key = self.identity(delivery)
        if key is None:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "Message %s has no identity (no %s): it is handled without idempotency",
                    delivery.message_id,
                    f"header {self._header!r}" if self._header else "message id",
                )
            await call_next(delivery)
            return
        store = self._store
        owner = uuid.uuid4().hex
        try:
            state = await store.claim(key, owner, self._lease)
            if state is ClaimState.BUSY:
                state = await self._wait_for(key, owner)
        except Exception as exc:
            if isinstance(exc, Unsettled):
                raise
            await self._store_failed(key, "claiming", exc)
        self._failures = 0
        if self._given_back:
            given_back = self._given_back.pop(key, 0)
            if given_back:
                # The deliveries this layer gave back never reached the handler: they do not
                # count against the attempt limit (the broker's delivery count does include them).
                delivery.attempt = max(1, delivery.attempt - given_back)
        if state is ClaimState.COMPLETED:
            delivery.outcome = Outcome.DUPLICATE
            delivery.reason = "duplicate"
            return
        token = _TRANSACTION.set(None)
        in_handler = False
        try:
            async with store.complete(key, owner, self._ttl, delivery) as transaction:
                _TRANSACTION.set(transaction)
                in_handler = True
                await call_next(delivery)
                in_handler = False
                if delivery.outcome is Outcome.DEFERRED:
                    raise _NotCompleted  # rolls the store's transaction back
        except _NotCompleted:
            # The retry layer handed the next attempt to the broker: the message is not done.
            await self._release(key, owner)
        except BaseException as exc:
            await self._release(key, owner)
            if in_handler or not isinstance(exc, Exception) or isinstance(exc, Unsettled):
                raise
            # The store failed opening its transaction or writing the completion record.
            await self._store_failed(key, "completing", exc)
        finally:
            _TRANSACTION.reset(token)

    async def _store_failed(self, key: str, step: str, exc: Exception) -> NoReturn:
        """Wait the store's backoff, then give the delivery back to be delivered again."""
        self._failures += 1
        wait = wait_after(_STORE_WAIT, self._failures)
        logger.warning(
            "The idempotency store failed %s %r (failure %d in a row); the message is given "
            "back after %.2fs: %r",
            step,
            key,
            self._failures,
            wait,
            exc,
        )
        await self._clock.sleep(wait)
        self._give_back(key)
        raise StoreUnavailable(
            f"the idempotency store failed {step} {key!r}; given back to be delivered again"
        ) from exc

    async def _wait_for(self, key: str, owner: str) -> ClaimState:
        clock = self._clock
        deadline = clock.monotonic() + self._wait
        while True:
            left = deadline - clock.monotonic()
            if left <= 0:
                self._give_back(key)
                raise InProgressElsewhere(
                    f"another consumer is processing {key!r}; given back to be delivered again"
                )
            await clock.sleep(min(self._poll, left))
            state = await self._store.claim(key, owner, self._lease)
            if state is not ClaimState.BUSY:
                return state

    def _give_back(self, key: str) -> None:
        """Remember that a delivery of ``key`` goes back to the broker without an attempt."""
        given = self._given_back
        given[key] = given.pop(key, 0) + 1
        if len(given) > MAX_GIVEN_BACK:
            given.popitem(last=False)

    async def _release(self, key: str, owner: str) -> None:
        try:
            await asyncio.shield(self._store.release(key, owner))
        except BaseException as exc:  # the claim then lapses when its lease ends
            logger.warning("Releasing the idempotency claim on %r failed: %r", key, exc)

    def __repr__(self) -> str:
        return f"Idempotency({self._store!r}, lease={self._lease:g}, ttl={self._ttl:g})"
