"""Composable resilience middleware for async message handlers.

The everyday names are importable from here; each also lives in its own module
(``resilience.consumer``, ``resilience.policy``, ``resilience.pipeline``, ...).

Every module logs through stdlib loggers named ``resilience.*`` (structlog events included, see
``resilience._log``). Nothing is printed until the application configures logging.
"""

from __future__ import annotations

import logging

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

# Records of the ``resilience.*`` loggers reach only the handlers the application configures;
# without any, nothing is printed (no fallback to logging's last-resort handler).
logging.getLogger(__name__).addHandler(logging.NullHandler())
