"""Frozen parts of a circuit breaker: its states, configuration, event records and stats."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from datetime import timedelta

from ..errors import ConfigError
from ..events import Event
from ..types import GATES_EXTRA
from .window import CountWindow, TimeWindow, Window

__all__ = [
    "GATES_EXTRA",
    "BreakerConfig",
    "BreakerState",
    "BreakerStateChanged",
    "BreakerStats",
    "CallNotPermitted",
    "seconds_of",
]


class BreakerState(enum.Enum):
    """Where a breaker is."""

    CLOSED = "closed"
    """Calls go through; outcomes are recorded and may trip the breaker."""
    OPEN = "open"
    """Calls are not permitted until the open wait has passed."""
    HALF_OPEN = "half_open"
    """A limited number of probe calls go through; their outcome closes or reopens it."""
    FORCED_OPEN = "forced_open"
    """Opened by hand: nothing goes through until :meth:`Breaker.reset`."""
    FORCED_CLOSED = "forced_closed"
    """Closed by hand: everything goes through, nothing is recorded, it never trips."""


def _seconds(value: object, name: str, *, positive: bool = False) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ConfigError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    result = float(value)
    if result < 0 or (positive and result == 0) or result == float("inf"):
        raise ConfigError(
            f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}"
        )
    return result


def seconds_of(value: float | timedelta | None) -> float:
    """A normalised config value as float seconds (0.0 for ``None``)."""
    if value is None:
        return 0.0
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _rate(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be a fraction in (0, 1] (0.5 = 50%), got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker trips and how it recovers (immutable; shared by equal names).

    Args:
        failure_threshold: Trip after failures of this many distinct messages in a row (the
            repeated failures of one message count once; ``None`` or 0: off).
        window: A :class:`~resilience.breaker.CountWindow` or
            :class:`~resilience.breaker.TimeWindow` over which the rates are computed
            (``None``: no rate conditions).
        failure_rate: Trip when failures / calls in the window reach this fraction, once the
            window holds ``minimum_calls`` (default 0.5 when a window is given). Also the share
            of failed probes that reopens a half-open breaker.
        slow_call_duration: A call lasting at least this long (seconds or ``timedelta``) is
            slow, whether it succeeded or failed.
        slow_call_rate: Trip when slow calls / calls in the window reach this fraction (default
            1.0 when ``slow_call_duration`` is given).
        open_wait: Seconds the breaker stays open after its first trip.
        open_wait_multiplier: Each further trip without a successful close in between
            multiplies the wait by this (1 keeps it constant).
        open_wait_max: Cap on the grown wait.
        half_open_probes: Calls admitted while half-open; all must finish before it closes, and
            further calls are not permitted meanwhile.

    Raises:
        ConfigError: a value is out of range or the combination cannot work (for example a
            rate without a window, or no trip condition at all).
    """

    failure_threshold: int | None = 3
    window: Window | None = None
    failure_rate: float | None = None
    slow_call_duration: float | timedelta | None = None
    slow_call_rate: float | None = None
    open_wait: float | timedelta = 10.0
    open_wait_multiplier: float = 2.0
    open_wait_max: float | timedelta = 300.0
    half_open_probes: int = 1

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        threshold = self.failure_threshold
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
                raise ConfigError(
                    f"failure_threshold must be an integer >= 1 (0 or None: off), got {threshold!r}"
                )
            put("failure_threshold", threshold or None)
        window = self.window
        if window is not None and not isinstance(window, CountWindow | TimeWindow):
            raise ConfigError(f"window must be a CountWindow or a TimeWindow, got {window!r}")
        if self.failure_rate is not None:
            if window is None:
                raise ConfigError("failure_rate needs a window (CountWindow or TimeWindow)")
            put("failure_rate", _rate(self.failure_rate, "failure_rate"))
        elif window is not None:
            put("failure_rate", 0.5)
        if self.slow_call_duration is not None:
            if window is None:
                raise ConfigError("slow_call_duration needs a window to compute a slow-call rate")
            put(
                "slow_call_duration",
                _seconds(self.slow_call_duration, "slow_call_duration", positive=True),
            )
            rate = 1.0 if self.slow_call_rate is None else self.slow_call_rate
            put("slow_call_rate", _rate(rate, "slow_call_rate"))
        elif self.slow_call_rate is not None:
            raise ConfigError("slow_call_rate needs slow_call_duration (what counts as slow)")
        if self.failure_threshold is None and window is None:
            raise ConfigError(
                "the breaker has no trip condition: set failure_threshold and/or a window"
            )
        put("open_wait", _seconds(self.open_wait, "open_wait", positive=True))
        multiplier = self.open_wait_multiplier
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            raise ConfigError(f"open_wait_multiplier must be a number >= 1, got {multiplier!r}")
        if not 1 <= multiplier < float("inf"):
            raise ConfigError(f"open_wait_multiplier must be >= 1, got {multiplier!r}")
        put("open_wait_multiplier", float(multiplier))
        put("open_wait_max", _seconds(self.open_wait_max, "open_wait_max", positive=True))
        if seconds_of(self.open_wait_max) < seconds_of(self.open_wait):
            raise ConfigError(
                f"open_wait_max ({self.open_wait_max:g}) must be >= open_wait ({self.open_wait:g})"
            )
        probes = self.half_open_probes
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ConfigError(f"half_open_probes must be an integer >= 1, got {probes!r}")


@dataclass(frozen=True, slots=True)
class BreakerStateChanged(Event):
    """A breaker moved from one state to another.

    ``message_id`` and ``key`` name the delivery whose outcome caused the change (``None`` for
    a timer or a manual change). ``at`` is the breaker clock's monotonic time; ``open_until``
    is set when the new state is open.
    """

    name: str
    from_state: BreakerState
    to_state: BreakerState
    reason: str
    at: float
    open_until: float | None = None


@dataclass(frozen=True, slots=True)
class CallNotPermitted(Event):
    """A breaker did not let a delivery through: ``held`` (pause mode) or rejected."""

    name: str
    state: BreakerState
    held: bool


@dataclass(frozen=True, slots=True)
class BreakerStats:
    """A snapshot of one breaker.

    Attributes:
        name: The breaker's name.
        state: Its state.
        calls: Calls in the sliding window (0 without a window).
        failures: Failed calls in the window.
        slow_calls: Slow calls in the window.
        failure_rate: ``failures / calls`` (0.0 while the window is empty).
        slow_call_rate: ``slow_calls / calls``.
        consecutive_failures: Distinct messages that failed since the last success.
        open_until: Monotonic time the open state ends (``None`` unless open).
        open_wait: The length of the current (or last) open period, in seconds.
        trips: Trips since the breaker last closed from half-open (drives the wait growth).
        probes_in_flight: Half-open probes running now.
        not_permitted: Deliveries held or rejected since the breaker was created.
    """

    name: str
    state: BreakerState
    calls: int
    failures: int
    slow_calls: int
    failure_rate: float
    slow_call_rate: float
    consecutive_failures: int
    open_until: float | None
    open_wait: float
    trips: int
    probes_in_flight: int
    not_permitted: int
