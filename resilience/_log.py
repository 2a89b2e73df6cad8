"""Library loggers: structured events delivered through stdlib ``logging``.

The package logs with structlog's API (``log.info("retry_scheduled", attempt=2)``) but hands
every event to the stdlib logger of the same name, so applications control it with ordinary
``logging`` configuration (levels, handlers) whether or not they configured structlog, and
nothing is printed unless they asked for it. :func:`resilience.logging.configure_logging`
renders these events, with their fields, as JSON or console lines.
"""

from __future__ import annotations

import logging

import structlog

__all__ = ["get_logger"]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger bound to the stdlib logger ``name``, independent of global config."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.render_to_log_kwargs,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return logger
