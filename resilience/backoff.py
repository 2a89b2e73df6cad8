"""Backoff strategies: small frozen dataclasses that produce tenacity waits.

Any tenacity wait is accepted where a strategy is (they compose with ``+``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import tenacity
from tenacity.wait import wait_base

from ._units import seconds
from .errors import ConfigError

__all__ = [
    "Backoff",
    "DecorrelatedJitter",
    "Exponential",
    "Fixed",
    "FullJitter",
    "tenacity_wait",
]


@dataclass(frozen=True, slots=True)
class Fixed:
    """The same wait before every retry."""

    delay: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "delay", seconds(self.delay, "Fixed.delay"))

    def to_tenacity(self) -> wait_base:
        """The equivalent tenacity wait."""
        return tenacity.wait_fixed(self.delay)


@dataclass(frozen=True, slots=True)
class Exponential:
    """``initial * multiplier ** (n - 1)`` before retry ``n``, capped at ``maximum``."""

    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        _check_exponential(self, "Exponential")

    def to_tenacity(self) -> wait_base:
        """The equivalent tenacity wait."""
        return tenacity.wait_exponential(
            multiplier=self.initial, exp_base=self.multiplier, max=self.maximum
        )


@dataclass(frozen=True, slots=True)
class FullJitter:
    """A uniformly random wait between 0 and the capped exponential value (AWS "full jitter")."""

    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        _check_exponential(self, "FullJitter")

    def to_tenacity(self) -> wait_base:
        """The equivalent tenacity wait."""
        return tenacity.wait_random_exponential(
            multiplier=self.initial, exp_base=self.multiplier, max=self.maximum
        )


class _WaitDecorrelated(wait_base):
    """Per-message tenacity wait: ``min(maximum, uniform(initial, previous * 3))``."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rng = rng if rng is not None else random._inst
        self.previous = initial

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        upper = max(self.initial, self.previous * 3)
        self.previous = min(self.maximum, self.rng.uniform(self.initial, upper))
        return self.previous


@dataclass(frozen=True, slots=True)
class DecorrelatedJitter:
    """Decorrelated jitter: each wait is random between ``initial`` and 3x the previous one.

    Args:
        initial: The smallest wait and the first upper bound's base.
        maximum: Cap on every wait.
        rng: Random source (seed one for reproducible runs); the ``random`` module by default.
    """

    initial: float = 0.1
    maximum: float = 30.0
    rng: random.Random | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", seconds(self.initial, "DecorrelatedJitter.initial"))
        object.__setattr__(self, "maximum", seconds(self.maximum, "DecorrelatedJitter.maximum"))
        if self.maximum < self.initial:
            raise ConfigError("DecorrelatedJitter.maximum must be >= initial")

    def to_tenacity(self) -> wait_base:
        """A fresh tenacity wait (it remembers the previous wait, so one per message)."""
        return _WaitDecorrelated(self.initial, self.maximum, self.rng)


def _check_exponential(obj: Exponential | FullJitter, name: str) -> None:
    object.__setattr__(obj, "initial", seconds(obj.initial, f"{name}.initial"))
    object.__setattr__(obj, "maximum", seconds(obj.maximum, f"{name}.maximum"))
    if obj.maximum < obj.initial:
        raise ConfigError(f"{name}.maximum must be >= initial ({obj.initial}), got {obj.maximum}")
    if not obj.multiplier >= 1:
        raise ConfigError(f"{name}.multiplier must be >= 1, got {obj.multiplier!r}")


Backoff = Fixed | Exponential | FullJitter | DecorrelatedJitter | wait_base
"""A backoff strategy: one of this module's, or any tenacity wait (they compose with ``+``)."""


def tenacity_wait(backoff: Backoff) -> wait_base:
    if isinstance(backoff, wait_base):
        return backoff
    return backoff.to_tenacity()


STORE_WAIT_INITIAL = 0.05
"""Half the first wait after a failed store operation (the other half is random)."""

_NO_RETRYING = tenacity.Retrying()


def store_failure_wait(cap: float) -> wait_base:
    """The wait after a store (dead-letter destination, idempotency store) failed: "equal
    jitter" exponential backoff.

    After the ``n``-th consecutive failure it waits between ``e`` and ``2e`` seconds,
    ``e = min(0.05 * 2 ** (n - 1), cap / 2)``: the fixed half makes it grow for sure, the random
    half spreads the attempts of many messages waiting on one store.

    Args:
        cap: The longest wait; 0 means no wait.

    Returns:
        A tenacity wait strategy (read ``attempt_number`` only).
    """
    if cap <= 0:
        return tenacity.wait_none()
    half = cap / 2
    return tenacity.wait_exponential(
        multiplier=STORE_WAIT_INITIAL, max=half
    ) + tenacity.wait_random_exponential(multiplier=STORE_WAIT_INITIAL, max=half)


def wait_after(strategy: wait_base, failures: int) -> float:
    """The wait ``strategy`` gives after the ``failures``-th failure."""
    state = tenacity.RetryCallState(_NO_RETRYING, None, (), {})
    state.attempt_number = max(1, failures)
    return float(strategy(state))
