"""Library loggers: structured events delivered through stdlib ``logging``.

The package logs with structlog's API (``log.info("retry_scheduled", attempt=2)``) but hands
every event to the stdlib logger of the same name, so applications control it with ordinary
``logging`` configuration (levels, handlers) whether or not they configured structlog, and
nothing is printed unless they asked for it (the ``resilience`` logger carries a
``NullHandler``). The record's fields become attributes of the ``LogRecord`` and its location is
the line that logged. :func:`resilience.logging.configure_logging` renders these events, with
their fields, as JSON or console lines.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from types import FrameType
from typing import Any

import structlog

__all__ = ["get_logger"]

_STRUCTLOG_DIR = os.path.dirname(structlog.__file__) + os.sep
_STDLIB_FIND_CALLER = logging.Logger.findCaller

_RESERVED = (frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}) - {
    "exc_info",
    "stack_info",
}
"""LogRecord attributes a field must not overwrite (``exc_info`` and ``stack_info`` are passed
to the stdlib call as keywords)."""


def _keep_record_attributes(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # stdlib refuses an ``extra`` that overwrites a LogRecord attribute (a context variable
    # bound as ``name``, say) by raising: rename such a field instead of failing the caller.
    for key in _RESERVED.intersection(event_dict):
        event_dict[f"{key}_"] = event_dict.pop(key)
    return event_dict


def _drop_unheard(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Below the logger's level, or reaching no handler but NullHandlers (the library's default:
    # nothing configured), the event is dropped before a record is made: a dead letter or a
    # retry in an incident then costs no LogRecord, caller lookup or field copying that nobody
    # reads. Any other handler, or a filter on the way (which may look at records), gets it.
    structlog.stdlib.filter_by_level(logger, method_name, event_dict)
    if _plain(type(logger)) and not _heard(logger, method_name):
        raise structlog.DropEvent
    return event_dict


def _plain(cls: type) -> bool:
    """Whether loggers of ``cls`` hand records to handlers as the stdlib's own (a subclass may
    change only how the caller is found, as structlog's LoggerFactory's does)."""
    return (
        issubclass(cls, logging.Logger)
        and cls.makeRecord is logging.Logger.makeRecord
        and cls.handle is logging.Logger.handle
        and cls.callHandlers is logging.Logger.callHandlers
    )


def _heard(logger: logging.Logger, method_name: str) -> bool:
    """Whether a record of ``logger`` would reach a handler that does something (or a filter)."""
    found = False
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return True
        for handler in current.handlers:
            if type(handler) is not logging.NullHandler:
                return True
            found = True
        if not current.propagate:
            break
        current = current.parent
    if found:
        return False
    # No handler at all: the stdlib's last resort prints from its level up.
    level = logging.getLevelName(method_name.upper())
    last = logging.lastResort
    return not isinstance(level, int) or (last is not None and level >= last.level)


def _caller_location(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # The stdlib call is made from inside structlog; skip its frames so that the record's
    # pathname, lineno and funcName name the library line that logged. Counted from here, the
    # structlog frames include the one running the processors, which is gone when the stdlib
    # method runs; its stacklevel 1 is the first frame outside logging, so the count is exactly
    # the stacklevel of the caller. Only for the stdlib's own findCaller: other logger classes
    # (structlog's LoggerFactory installs one that skips structlog itself) are left alone.
    if type(logger).findCaller is not _STDLIB_FIND_CALLER:
        return event_dict
    frame: FrameType | None = sys._getframe(1)
    frames = 0
    while frame is not None and frame.f_code.co_filename.startswith(_STRUCTLOG_DIR):
        frames += 1
        frame = frame.f_back
    event_dict.setdefault("stacklevel", max(frames, 1))
    return event_dict


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger bound to the stdlib logger ``name``, independent of global config.

    Args:
        name: The stdlib logger's name (under ``resilience``).

    Returns:
        A bound logger whose events become records of ``logging.getLogger(name)``.
    """
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            _drop_unheard,
            structlog.contextvars.merge_contextvars,
            _keep_record_attributes,
            _caller_location,
            structlog.stdlib.render_to_log_kwargs,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return logger
