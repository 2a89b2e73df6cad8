"""Waiting for the broker at startup, with a deadline and warnings at growing intervals."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from abe.backends.message_queue.base.connection import ConnectionStatus, ReportsConnection
from abe.backends.message_queue.service._settings_common import redact

__all__ = ["BrokerUnreachable", "await_broker", "broker_address", "connection_of"]

log = logging.getLogger("resilience.cli.run")

_POLL = 0.05
"""Seconds between two looks at the connection status while waiting."""

_QUIET = 1.0
"""Seconds of waiting before the first warning: a broker that answers at once says nothing."""

_WARN_MAX = 60.0


class BrokerUnreachable(Exception):
    """The broker did not answer within the connect timeout."""


def connection_of(backend: object) -> ConnectionStatus | None:
    """The backend's live connection status, if it reports one."""
    if isinstance(backend, ReportsConnection):
        status = backend.connection
        if isinstance(status, ConnectionStatus):
            return status
    return None


def broker_address(backend: object) -> str:
    """Where the backend connects, with any password hidden (``""`` when it does not say)."""
    settings = getattr(backend, "settings", None)
    url = getattr(settings, "url", None)
    if not isinstance(url, str):
        return ""
    return redact(url)


async def await_broker(
    backend: Any, run_task: asyncio.Task[Any], stop: asyncio.Event, limit: float
) -> None:
    """Return once the backend reached its broker, the consumer ended, or a stop was asked for.

    Meanwhile the backend's own outage warnings are held back and this function warns instead,
    after a quiet second, then at growing intervals (at most once a minute), with the attempts
    made and the time spent. A backend that does not report its connection returns at once.

    Args:
        backend: The consumer's backend.
        run_task: The task running the consumer (its failure ends the wait).
        stop: Set when the command is asked to stop.
        limit: Seconds to wait at most; 0 waits forever.

    Raises:
        BrokerUnreachable: ``limit`` passed without the broker answering; the message says
            where, how long, how many attempts and the last error.
    """
    status = connection_of(backend)
    if status is None:
        return
    loop = asyncio.get_running_loop()
    started = loop.time()
    last_warned = started
    where = broker_address(backend) or type(backend).__name__
    status.warn = False
    try:
        while status.connected is not True and not run_task.done() and not stop.is_set():
            now = loop.time()
            waited = now - started
            if limit and waited >= limit:
                raise BrokerUnreachable(
                    f"cannot reach the broker at {where} within {limit:g}s "
                    f"({status.attempts} attempt(s)): {status.last_error or 'no answer'}"
                )
            if (
                status.attempts
                and waited >= _QUIET
                and now - last_warned >= min(_WARN_MAX, max(_QUIET, waited / 2))
            ):
                last_warned = now
                log.warning(
                    "waiting for the broker at %s: unreachable for %.1fs (attempt %d): %s%s",
                    where,
                    waited,
                    status.attempts,
                    status.last_error,
                    f"; giving up after {limit:g}s" if limit else "",
                )
            await asyncio.sleep(_POLL)
    finally:
        status.warn = True
