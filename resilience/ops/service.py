"""The running consumer of ``resilience run``: its lifecycle, readiness, breakers and reloads.

One :class:`Service` owns the backend and the current
:class:`~resilience.consumer.ResilientConsumer`. A policy reload drains the current consumer
(its in-flight messages finish under the policy they started with, within ``--drain-timeout``)
and starts a new one on the same backend with the new policy; a policy file that does not load
is refused and the running consumer is left alone. Consumers replaced by a reload are kept, so
the counts they reported stay in the cumulative metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resilience.breaker import BreakerState, default_registry
from resilience.errors import ConfigError
from resilience.events import MessageSettled, Outcome
from resilience.ops.connect import connection_of
from resilience.ops.summary import policy_summary

if TYPE_CHECKING:
    from resilience.breaker import Breaker
    from resilience.consumer import ResilientConsumer
    from resilience.policy import Policy

__all__ = ["BREAKER_ACTIONS", "ReloadResult", "Service", "Tally"]

log = logging.getLogger("resilience.cli.run")

_OPEN_STATES = (BreakerState.OPEN, BreakerState.FORCED_OPEN)

BREAKER_ACTIONS: dict[str, str] = {"open": "force_open", "close": "force_closed", "reset": "reset"}
"""Runtime breaker control: action name -> :class:`~resilience.breaker.CircuitBreaker` method."""


class Tally:
    """Counts settled messages by outcome (subscribe it to a consumer's event bus).

    Unlike :class:`resilience.testing.Outcomes` it keeps no event records, so a consumer that
    runs for weeks does not grow.
    """

    def __init__(self) -> None:
        self.counts: Counter[Outcome] = Counter()
        self.total = 0
        self._changed = asyncio.Event()

    def __call__(self, event: object) -> None:
        if isinstance(event, MessageSettled):
            self.counts[event.outcome] += 1
            self.total += 1
            self._changed.set()

    async def wait_for(self, total: int) -> None:
        """Return once at least ``total`` messages are settled."""
        while self.total < total:
            self._changed.clear()
            await self._changed.wait()


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload request did.

    Attributes:
        ok: Whether the new policy is in force.
        message: One line saying what happened (the error when refused).
    """

    ok: bool
    message: str


@dataclass(slots=True)
class Service:
    """The consumer of one ``resilience run`` process and what operators may ask of it.

    Attributes:
        backend: The backend every consumer of this service reads from.
        handler: The user's handler.
        policy: The policy in force (``None`` when the handler carries its own).
        make_consumer: Builds a consumer for a policy (``None``: the handler's own).
        load_policy: Reads the policy file again (raises :class:`ConfigError` when invalid).
    """

    backend: Any
    handler: Any
    policy: Policy | None
    make_consumer: Callable[[Policy | None], ResilientConsumer]
    load_policy: Callable[[], Policy] | None
    outcomes: Tally = field(default_factory=Tally)
    consumer: ResilientConsumer | None = None
    run_task: asyncio.Task[None] | None = None
    draining: bool = False
    reloads: int = 0
    _retired: list[ResilientConsumer] = field(default_factory=list)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start a consumer with the current policy; returns its task."""
        consumer = self.make_consumer(self.policy)
        consumer.events.subscribe(self.outcomes)
        self.consumer = consumer
        self.run_task = asyncio.create_task(consumer.run(self.handler))
        return self.run_task

    async def stop(self) -> None:
        """Drain and stop the current consumer (the ``--drain-timeout`` applies)."""
        self.draining = True
        if self.consumer is not None:
            await self.consumer.shutdown()

    @property
    def reloading(self) -> bool:
        """Whether a policy reload is in progress."""
        return self._reload_lock.locked()

    async def reloaded(self) -> None:
        """Return once no policy reload is in progress."""
        async with self._reload_lock:
            pass

    # -- policy reload --------------------------------------------------------------------------

    async def reload(self, source: str) -> ReloadResult:
        """Read the policy file again and put it in force.

        A file that does not load (a syntax error, an invalid value) is refused with one log
        line and the running policy stays. Otherwise the current consumer drains (in-flight
        messages finish under the policy they started with, within the drain timeout; any
        still running then are released and redelivered) and a new consumer starts with the
        new policy. A breaker whose configuration changed starts afresh (closed).

        Args:
            source: Who asked (``SIGHUP``, ``HTTP``), for the log line.

        Returns:
            Whether the new policy is in force, and a one-line message.
        """
        if self.load_policy is None:
            message = "policy reload refused: the handler carries its own policy (@resilient)"
            log.warning(message)
            return ReloadResult(False, message)
        async with self._reload_lock:
            if self.draining:
                return ReloadResult(False, "policy reload refused: the consumer is stopping")
            try:
                policy = self.load_policy()
                _forget_changed_breakers(policy)
                consumer = self.make_consumer(policy)
            except ConfigError as exc:
                message = f"policy reload ({source}) refused, the running policy stays: {exc}"
                log.error(message)
                return ReloadResult(False, message)
            old, old_task = self.consumer, self.run_task
            self.draining = True
            try:
                if old is not None:
                    await old.shutdown()
                    self._retired.append(old)
                if old_task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await old_task
            finally:
                self.draining = False
            self.policy = policy
            consumer.events.subscribe(self.outcomes)
            self.consumer = consumer
            self.run_task = asyncio.create_task(consumer.run(self.handler))
            self.reloads += 1
            message = f"policy reloaded ({source}): {policy_summary(policy)}"
            log.info(message)
            return ReloadResult(True, message)

    # -- health ---------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the consumer should receive traffic, and why not.

        Ready means: the backend reaches its broker, the consumer is running and not draining,
        and no circuit breaker is open.

        Returns:
            ``(ready, body)``; ``body["reasons"]`` lists what is wrong.
        """
        reasons: list[str] = []
        status = connection_of(self.backend)
        connected = True if status is None else status.connected is True
        if not connected:
            assert status is not None
            if status.connected is None:
                reasons.append("broker not connected yet")
            else:
                reasons.append(
                    f"broker unreachable for {status.down_for:.1f}s "
                    f"({status.attempts} attempt(s)): {status.last_error}"
                )
        if self.draining:
            reasons.append("draining")
        elif self.run_task is None or self.run_task.done():
            reasons.append("consumer not running")
        open_breakers = [b.name for b in breakers() if b.state in _OPEN_STATES]
        reasons.extend(f"circuit breaker {name!r} is open" for name in open_breakers)
        body = {
            "ready": not reasons,
            "reasons": reasons,
            "connected": connected,
            "draining": self.draining,
            "open_breakers": open_breakers,
            "in_flight": self.consumer.in_flight if self.consumer is not None else 0,
            "settled": self.outcomes.total,
        }
        return not reasons, body


def breakers() -> list[Breaker]:
    """The process's named circuit breakers (from the default registry), by name."""
    return sorted(default_registry, key=lambda b: b.name)


def breaker_info(breaker: Breaker) -> dict[str, Any]:
    """A breaker's state and window statistics as plain data."""
    stats = breaker.stats
    return {
        "name": stats.name,
        "state": stats.state.value,
        "calls": stats.calls,
        "failures": stats.failures,
        "failure_rate": stats.failure_rate,
        "consecutive_failures": stats.consecutive_failures,
        "trips": stats.trips,
        "not_permitted": stats.not_permitted,
    }


def control_breaker(name: str, action: str) -> dict[str, Any] | None:
    """Apply ``action`` (``open``, ``close``, ``reset``) to the breaker called ``name``.

    ``open`` is ``force_open()``, ``close`` is ``force_closed()`` and ``reset`` is ``reset()``:
    the same effect as calling them in the process.

    Args:
        name: The breaker's name.
        action: One of :data:`BREAKER_ACTIONS`.

    Returns:
        The breaker's new state as :func:`breaker_info` gives it; ``None`` when no breaker has
        that name.

    Raises:
        ValueError: an unknown action.
    """
    method = BREAKER_ACTIONS.get(action)
    if method is None:
        raise ValueError(f"action must be one of {', '.join(BREAKER_ACTIONS)}; got {action!r}")
    for breaker in breakers():
        if breaker.name == name:
            getattr(breaker, method)(reason=f"http_{action}")  # the breaker logs the change
            return breaker_info(breaker)
    return None


def _forget_changed_breakers(policy: Policy) -> None:
    """Drop registry breakers whose configuration ``policy`` changes, so it can build."""
    section = policy.sections.get("circuit_breaker")
    if section is None:
        return
    name = getattr(section, "name", None)
    config = getattr(section, "breaker", None)
    if not isinstance(name, str):
        return
    existing = default_registry.find(name)
    if existing is not None and existing.config != config:
        log.warning("circuit breaker %r: configuration changed; it starts closed", name)
        default_registry.remove(name)
