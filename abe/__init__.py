"""Abstract Backend: a pluggable message-queue layer.

Applications code against :mod:`abe.types` protocols; concrete providers are found at run time
through entry points by :func:`abe.backends.message_queue.loader.load_backend`.
"""

from __future__ import annotations

import logging

__all__ = ["__version__"]

# Library etiquette: records of the ``abe.*`` loggers reach only the handlers the application
# configures; without any, nothing is printed (no fallback to logging's last-resort handler).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
