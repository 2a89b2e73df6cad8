"""The metric instruments, created once per meter provider and shared by every consumer.

Synchronous instruments of the OpenTelemetry SDK cost more per call than the rest of the
pipeline (figures in ``benchmarks/README.md``), so the per-message path records one histogram
value and nothing else:
``messaging.client.consumed.messages`` is an asynchronous (observable) counter read from plain
integer counts, and the gauges for in-flight messages and breaker states are observable too.
An observable counter exports the same monotonic cumulative sum a synchronous one does.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.metrics import CallbackOptions, Observation

from .._version import __version__
from .events import (
    BREAKER_NAME,
    BREAKER_STATE_VALUES,
    CONSUMER_GROUP,
    SYSTEM,
    normalize_state,
)
from .setup import SCHEMA_URL

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = [
    "DURATION_BUCKETS",
    "Instruments",
    "MetricSource",
    "base_attributes",
    "instruments_for",
]

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
"""Histogram buckets (seconds) the messaging conventions recommend for durations."""


class MetricSource(Protocol):
    """What a :class:`~resilience.telemetry.Telemetry` exposes to the observable instruments."""

    def consumed_counts(self) -> Iterable[tuple[dict[str, Any], int]]:
        """Attributes and cumulative count of messages handed to the handler, per destination."""
        ...

    def in_flight_attributes(self) -> tuple[dict[str, Any], int]:
        """Attributes and number of messages being processed now."""
        ...

    def breaker_states(self) -> Iterable[tuple[str, str]]:
        """``(breaker name, state)`` of each breaker seen changing state."""
        ...


def _key(attrs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(attrs.items()))


class Instruments:
    """Every instrument of one meter provider.

    Args:
        provider: The meter provider to create them on.
    """

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("resilience", __version__, schema_url=SCHEMA_URL)
        self.sources: weakref.WeakSet[Any] = weakref.WeakSet()
        self.duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of processing one message, retries and waits included.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self.retries = meter.create_counter(
            "resilience.retries", unit="{retry}", description="Retries scheduled."
        )
        self.dead_letters = meter.create_counter(
            "resilience.dead_letters",
            unit="{message}",
            description="Messages dead-lettered, by reason.",
        )
        self.duplicates = meter.create_counter(
            "resilience.duplicates",
            unit="{message}",
            description="Duplicate deliveries acknowledged without running the handler.",
        )
        self.breaker_transitions = meter.create_counter(
            "resilience.breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes, by breaker and new state.",
        )
        meter.create_observable_counter(
            "messaging.client.consumed.messages",
            callbacks=[self._observe_consumed],
            unit="{message}",
            description="Messages delivered to the application.",
        )
        meter.create_observable_gauge(
            "resilience.in_flight",
            callbacks=[self._observe_in_flight],
            unit="{message}",
            description="Messages being processed now.",
        )
        meter.create_observable_gauge(
            "resilience.breaker.state",
            callbacks=[self._observe_breakers],
            unit="1",
            description="Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        )

    def _live(self) -> list[MetricSource]:
        return list(self.sources)

    def _observe_consumed(self, options: CallbackOptions) -> Iterator[Observation]:
        totals: dict[tuple[tuple[str, Any], ...], list[Any]] = {}
        for source in self._live():
            for attrs, count in source.consumed_counts():
                entry = totals.setdefault(_key(attrs), [attrs, 0])
                entry[1] += count
        for attrs, count in totals.values():
            yield Observation(count, attrs)

    def _observe_in_flight(self, options: CallbackOptions) -> Iterator[Observation]:
        totals: dict[tuple[tuple[str, Any], ...], list[Any]] = {}
        for source in self._live():
            attrs, count = source.in_flight_attributes()
            entry = totals.setdefault(_key(attrs), [attrs, 0])
            entry[1] += count
        for attrs, count in totals.values():
            yield Observation(count, attrs)

    def _observe_breakers(self, options: CallbackOptions) -> Iterator[Observation]:
        states: dict[str, str] = {}
        for source in self._live():
            states.update(source.breaker_states())
        states.update(_registered_breakers())
        for name, state in sorted(states.items()):
            yield Observation(BREAKER_STATE_VALUES[state], {BREAKER_NAME: name})


def _registered_breakers() -> dict[str, str]:
    """States of the breakers in :mod:`resilience.breaker`'s default registry, if it is loaded.

    Read at collection time, so the gauge is right from the start and after timer-driven
    changes that no event reached.
    """
    module = sys.modules.get("resilience.breaker")
    registry = getattr(module, "default_registry", None)
    states: dict[str, str] = {}
    if registry is None:
        return states
    try:
        for breaker in list(registry):
            state = normalize_state(getattr(breaker, "state", None))
            name = getattr(breaker, "name", None)
            if state is not None and isinstance(name, str):
                states[name] = state
    except Exception:  # a registry of another shape: events still feed the gauge
        return {}
    return states


_BY_PROVIDER: weakref.WeakKeyDictionary[Any, Instruments] = weakref.WeakKeyDictionary()


def instruments_for(provider: MeterProvider, source: MetricSource) -> Instruments:
    """The instruments of ``provider`` (created on first use), with ``source`` registered.

    Observable instruments can be registered once per provider, so every
    :class:`~resilience.telemetry.Telemetry` on one provider shares them and is observed through
    a weak reference (a consumer that is gone stops reporting).

    Args:
        provider: The meter provider.
        source: The telemetry middleware whose counts the observable instruments report.

    Returns:
        The shared :class:`Instruments`.
    """
    try:
        instruments = _BY_PROVIDER.get(provider)
    except TypeError:  # a provider that cannot be weakly referenced
        instruments = None
    if instruments is None:
        instruments = Instruments(provider)
        with contextlib.suppress(TypeError):
            _BY_PROVIDER[provider] = instruments
    instruments.sources.add(source)
    return instruments


def base_attributes(system: str, group: str | None) -> dict[str, Any]:
    """The attributes every messaging metric of one consumer carries.

    Args:
        system: ``messaging.system``.
        group: The consumer group, if any.

    Returns:
        A new dict.
    """
    attrs: dict[str, Any] = {SYSTEM: system}
    if group is not None:
        attrs[CONSUMER_GROUP] = group
    return attrs
