"""Abstract Backend: a pluggable message-queue layer.

Applications code against :mod:`abe.types` protocols; concrete providers are found at run time
through entry points by :func:`abe.backends.message_queue.loader.load_backend`.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
