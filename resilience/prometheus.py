"""Prometheus exposition of the OpenTelemetry instruments (``pip install 'abe-resilience[http]'``).

The instruments are recorded through ``opentelemetry-api`` as everywhere else; a
``PrometheusMetricReader`` from ``opentelemetry-exporter-prometheus`` collects them into a
``prometheus_client`` registry of its own, rendered by ``prometheus_client`` on each scrape.
Nothing here writes the text format by hand. Names follow the exporter's mapping: dots become
underscores, the unit is appended (``messaging.process.duration`` in seconds becomes
``messaging_process_duration_seconds``) and counters end in ``_total``.

Collection runs the observable instruments' callbacks (consumed messages, in-flight, breaker
states, broker connection) at scrape time, in the thread that serves the scrape: serve it from
the consumer's event loop and no lock is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from prometheus_client import CollectorRegistry

__all__ = ["CONTENT_TYPE", "PrometheusMetrics", "prometheus_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format's media type."""


@dataclass(frozen=True, slots=True)
class PrometheusMetrics:
    """A Prometheus reader and the registry it fills.

    Attributes:
        reader: The OpenTelemetry metric reader; give it to a ``MeterProvider``.
        registry: The ``prometheus_client`` registry the reader feeds (not the global one).
    """

    reader: MetricReader
    registry: CollectorRegistry

    def render(self) -> bytes:
        """Collect every instrument now and render the Prometheus text format.

        Returns:
            The exposition, UTF-8 encoded.
        """
        from prometheus_client import generate_latest

        data: bytes = generate_latest(self.registry)
        return data

    def meter_provider(
        self, service_name: str, readers: Sequence[MetricReader] = ()
    ) -> MeterProvider:
        """A new SDK ``MeterProvider`` with this reader (and ``readers``) attached.

        Args:
            service_name: The ``service.name`` resource attribute.
            readers: Further readers (a periodic OTLP or console exporter).

        Returns:
            The provider; install it with ``opentelemetry.metrics.set_meter_provider``.
        """
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        return MeterProvider(
            resource=Resource.create({"service.name": service_name}),
            metric_readers=[self.reader, *readers],
        )


def prometheus_metrics() -> PrometheusMetrics:
    """Create a Prometheus reader with a registry of its own.

    Returns:
        The reader and its registry.

    Raises:
        ImportError: ``opentelemetry-exporter-prometheus`` or ``prometheus-client`` is not
            installed (the ``http`` extra); the message says what to install.
    """
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry
    except ImportError as exc:
        raise ImportError(
            "Prometheus metrics need opentelemetry-exporter-prometheus and prometheus-client: "
            f"pip install 'abe-resilience[http]' ({exc})"
        ) from exc
    registry: Any = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(disable_target_info=True, registry=registry)
    return PrometheusMetrics(reader=reader, registry=registry)
