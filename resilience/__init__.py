"""Composable resilience middleware for async message handlers.

Every module logs through stdlib loggers named ``resilience.*`` (structlog events included, see
``resilience._log``). Nothing is printed until the application configures logging.
"""

from __future__ import annotations

import logging

__all__ = ["__version__"]

# Records of the ``resilience.*`` loggers reach only the handlers the application configures;
# without any, nothing is printed (no fallback to logging's last-resort handler).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
