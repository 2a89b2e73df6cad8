"""The ``resilience.broker.connected`` gauge: 1 while the backend reaches its broker, else 0."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from . import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from abe.backends.message_queue.base.connection import ConnectionStatus

__all__ = ["GAUGE_NAME", "watch_connection"]

GAUGE_NAME = "resilience.broker.connected"

_WATCHED: weakref.WeakKeyDictionary[Any, dict[int, tuple[ConnectionStatus, dict[str, str]]]] = (
    weakref.WeakKeyDictionary()
)


def watch_connection(
    provider: MeterProvider, status: ConnectionStatus, attributes: dict[str, str]
) -> None:
    """Report ``status`` through the ``resilience.broker.connected`` gauge of ``provider``.

    The gauge is created on the provider's first call; each watched status is one series
    (``attributes`` tell them apart, e.g. ``messaging.system``). ``connected`` unknown yet
    (no attempt finished) reads as 0.

    Args:
        provider: The meter provider.
        status: A backend's live connection status.
        attributes: The series' attributes.
    """
    watched = _WATCHED.get(provider)
    if watched is None:
        watched = _WATCHED[provider] = {}
        meter = provider.get_meter("resilience", __version__)

        def observe(options: CallbackOptions) -> Iterator[Observation]:
            for status, attrs in list(watched.values()):
                yield Observation(1 if status.connected else 0, attrs)

        meter.create_observable_gauge(
            GAUGE_NAME,
            callbacks=[observe],
            unit="1",
            description="Whether the consumer's backend reaches its broker (1) or not (0).",
        )
    watched[id(status)] = (status, dict(attributes))
