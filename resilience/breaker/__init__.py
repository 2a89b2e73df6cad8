"""Circuit breaking: the shared breaker state, its windows and config, the middleware.

See :mod:`resilience.breaker.middleware` for how a breaker trips, holds and recovers.
"""

from __future__ import annotations

from .config import (
    GATES_EXTRA,
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    BreakerStats,
    CallNotPermitted,
)
from .middleware import CircuitBreaker
from .registry import BreakerOptions, BreakerRegistry, default_registry, get_breaker
from .section import CircuitBreakerConfig, policy_section
from .state import Breaker
from .window import CountWindow, TimeWindow, Window

__all__ = [
    "GATES_EXTRA",
    "Breaker",
    "BreakerConfig",
    "BreakerOptions",
    "BreakerRegistry",
    "BreakerState",
    "BreakerStateChanged",
    "BreakerStats",
    "CallNotPermitted",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CountWindow",
    "TimeWindow",
    "Window",
    "default_registry",
    "get_breaker",
    "policy_section",
]
