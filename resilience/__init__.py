"""Composable resilience middleware for async message handlers.

The everyday names are importable from here; each also lives in its own module
(``resilience.consumer``, ``resilience.policy``, ``resilience.pipeline``, ...).
"""

from __future__ import annotations

from ._version import __version__
from .breaker import CircuitBreaker
from .consumer import ResilientConsumer
from .dead_letter import DeadLetterRouter
from .pipeline import Pipeline
from .policy import Policy, resilient
from .retry import Retry
from .timeout import Timeout

__all__ = [
    "CircuitBreaker",
    "DeadLetterRouter",
    "Pipeline",
    "Policy",
    "ResilientConsumer",
    "Retry",
    "Timeout",
    "__version__",
    "resilient",
]
