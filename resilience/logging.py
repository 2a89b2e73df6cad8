"""structlog configuration and the per-message log context.

While a message is in the pipeline, every log line, the library's and the handler's, structlog
or stdlib, can carry ``message_id``, ``key``, ``attempt``, ``trace_id`` and ``span_id``:

* the outermost middleware (:class:`~resilience.telemetry.Telemetry`, or :class:`LogContext`,
  which ``[telemetry] log_context = true`` adds when OpenTelemetry is off) puts the delivery in
  one context variable;
* :func:`add_delivery_context`, a structlog processor, reads it when a line is written, so the
  attempt number is the current one even after retries, and takes the trace and span ids from
  the OpenTelemetry span that is current at that moment (a handler's own child span included).

Reading the context only when a line is written costs one context-variable set per message,
far less than binding five structlog context variables per message.

:func:`configure_logging` wires it all up: structlog renders through stdlib ``logging`` (so
handlers of users and libraries keep working), as JSON lines for production or as readable
console output for the demo. Applications with a structlog setup of their own add
:func:`add_delivery_context` to their processors; plain stdlib setups add
:class:`DeliveryContextFilter` to a handler and use ``%(trace_id)s`` and friends.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar, Token
from typing import IO, TYPE_CHECKING, Any, Literal

import structlog
from opentelemetry import trace

from .hooks import HookLayer

if TYPE_CHECKING:
    from .delivery import Delivery
    from .types import CallNext

__all__ = [
    "CONTEXT_KEYS",
    "DeliveryContextFilter",
    "LogContext",
    "LogFormat",
    "add_delivery_context",
    "configure_logging",
    "current_delivery",
    "formatter",
]

LogFormat = Literal["auto", "json", "console"]
"""``json`` (one JSON object per line), ``console`` (readable), ``auto`` (console on a tty)."""

CONTEXT_KEYS = ("message_id", "key", "attempt", "trace_id", "span_id")
"""The keys :func:`add_delivery_context` adds to a log line."""

_DELIVERY: ContextVar[Delivery | None] = ContextVar("resilience_delivery", default=None)
_reset = _DELIVERY.reset
"""The context variable's ``reset``, bound once: :meth:`LogContext.leave` calls it with no
method lookup per message."""
_HANDLER_MARK = "_resilience_handler"


def current_delivery() -> Delivery | None:
    """The delivery the current task is processing, if it runs inside a pipeline.

    Returns:
        The :class:`~resilience.delivery.Delivery`, or ``None`` outside the pipeline (or when
        neither :class:`~resilience.telemetry.Telemetry` nor :class:`LogContext` is in it).
    """
    return _DELIVERY.get()


def _context(delivery: Delivery | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if delivery is not None:
        if delivery.message_id is not None:
            values["message_id"] = delivery.message_id
        if delivery.key is not None:
            values["key"] = delivery.key
        values["attempt"] = delivery.attempt
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        values["trace_id"] = format(span_context.trace_id, "032x")
        values["span_id"] = format(span_context.span_id, "016x")
    return values


def add_delivery_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add the current message's ids and the current trace/span ids.

    Keys the log call passed explicitly win. Outside a pipeline only the trace ids are added
    (when a span is current).

    Args:
        logger: The wrapped logger (unused).
        method_name: The log method's name (unused).
        event_dict: The event being logged.

    Returns:
        ``event_dict`` with ``message_id``, ``key``, ``attempt``, ``trace_id`` and ``span_id``
        where known.
    """
    for name, value in _context(_DELIVERY.get()).items():
        event_dict.setdefault(name, value)
    return event_dict


class DeliveryContextFilter(logging.Filter):
    """stdlib filter that sets the :data:`CONTEXT_KEYS` as attributes of every record.

    Unknown values are ``None``, so ``%(trace_id)s`` in a format string never fails. Attach it to
    a handler: ``handler.addFilter(DeliveryContextFilter())``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the attributes; never drops a record.

        Args:
            record: The record being handled.

        Returns:
            Always ``True``.
        """
        values = _context(_DELIVERY.get())
        for name in CONTEXT_KEYS:
            if not hasattr(record, name):
                setattr(record, name, values.get(name))
        return True


class LogContext(HookLayer):
    """Middleware that makes the delivery visible to :func:`add_delivery_context`.

    :class:`~resilience.telemetry.Telemetry` does this itself; ``[telemetry] log_context = true``
    adds this lighter layer when OpenTelemetry is off (one context-variable set and reset per
    message; figures in ``benchmarks/README.md``). Put it outermost.
    """

    __slots__ = ()

    enter: Callable[[Delivery], Token[Delivery | None]] = staticmethod(_DELIVERY.set)  # type: ignore[assignment]
    """Make the delivery the current delivery; returns the context-variable token that
    :meth:`leave` resets. The context variable's own ``set``, so the compiled run calls it
    with no Python frame in between."""

    def leave(self, token: Token[Delivery | None], delivery: Delivery) -> None:
        """Restore the previous current delivery.

        Args:
            token: What :meth:`enter` returned.
            delivery: The message.
        """
        _reset(token)

    async def fail(
        self,
        token: Token[Delivery | None],
        delivery: Delivery,
        exc: BaseException,
        call_next: CallNext,
    ) -> None:
        """Restore the previous current delivery and re-raise.

        Args:
            token: What :meth:`enter` returned.
            delivery: The message.
            exc: What the rest of the pipeline raised.
            call_next: Unused.

        Raises:
            BaseException: ``exc``.
        """
        _reset(token)
        raise exc

    def __repr__(self) -> str:
        return "LogContext()"


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        add_delivery_context,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _is_json(fmt: LogFormat, stream: IO[str]) -> bool:
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format must be one of auto, json, console; got {fmt!r}")
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return fmt == "json"


def formatter(fmt: LogFormat = "json", *, colors: bool = False) -> logging.Formatter:
    """A stdlib formatter that renders structlog and plain stdlib records alike.

    Use it on handlers of your own when structlog is set up by :func:`configure_logging`.

    Args:
        fmt: ``json`` or ``console`` (``auto`` means ``json`` here).
        colors: Colour the console output.

    Returns:
        A :class:`structlog.stdlib.ProcessorFormatter`.

    Raises:
        ValueError: ``fmt`` is not a known format.
    """
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format must be one of auto, json, console; got {fmt!r}")
    renderer: Any
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    else:
        final.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(default=str)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder()],
        processors=[*final, renderer],
    )


def configure_logging(
    fmt: LogFormat = "auto",
    *,
    level: int | str = logging.INFO,
    stream: IO[str] | None = None,
    colors: bool | None = None,
) -> logging.Handler:
    """Configure structlog and stdlib logging for a consumer process.

    structlog loggers go through stdlib ``logging``; one handler on the root logger renders
    both (structlog events and stdlib records such as ``AsyncLoopConsumer``'s) with the message
    context of :func:`add_delivery_context`. Handlers users add to stdlib loggers keep receiving
    records. Calling it again replaces the handler it installed before.

    Args:
        fmt: ``json`` for production (one JSON object per line), ``console`` for people,
            ``auto`` for console on a terminal and JSON otherwise.
        level: Root log level.
        stream: Where to write (``sys.stderr`` by default).
        colors: Colour console output (default: when ``stream`` is a terminal).

    Returns:
        The handler installed on the root logger.

    Raises:
        ValueError: ``fmt`` is not a known format.
    """
    out: IO[str] = stream if stream is not None else sys.stderr
    json_lines = _is_json(fmt, out)
    if colors is None:
        isatty = getattr(out, "isatty", None)
        colors = bool(isatty is not None and isatty())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter("json" if json_lines else "console", colors=colors))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
