"""Detecting and setting up an OpenTelemetry SDK.

Library code depends on ``opentelemetry-api`` only; :func:`configure_otel` imports the SDK (the
``otel`` extra) and, for OTLP, ``opentelemetry-exporter-otlp``, when it is called.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

from opentelemetry import metrics, trace

from ..errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = [
    "EXPORTERS",
    "SCHEMA_URL",
    "configure_otel",
    "messaging_system",
    "metrics_configured",
    "tracing_configured",
]

logger = logging.getLogger("resilience.telemetry")

EXPORTERS = ("console", "otlp", "none")
SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"
"""The semantic-conventions version the spans and metrics follow."""

_NO_TRACES: tuple[type[Any], ...] = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
try:
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    _NO_METRICS: tuple[type[Any], ...] = (metrics.NoOpMeterProvider, _ProxyMeterProvider)
except ImportError:  # pragma: no cover - older or newer API layout
    _NO_METRICS = (metrics.NoOpMeterProvider,)


def tracing_configured(provider: TracerProvider | None = None) -> bool:
    """Whether spans would be recorded: an SDK (not the API's no-op) tracer provider is set.

    Args:
        provider: The provider to check; the global one when ``None``.

    Returns:
        ``True`` for any provider other than the API's proxy and no-op ones.
    """
    return not isinstance(provider or trace.get_tracer_provider(), _NO_TRACES)


def metrics_configured(provider: MeterProvider | None = None) -> bool:
    """Whether metrics would be recorded: an SDK (not the API's no-op) meter provider is set.

    Args:
        provider: The provider to check; the global one when ``None``.

    Returns:
        ``True`` for any provider other than the API's proxy and no-op ones.
    """
    return not isinstance(provider or metrics.get_meter_provider(), _NO_METRICS)


def messaging_system(backend: object) -> str:
    """``messaging.system`` for a backend: its ``messaging_system`` attribute, or its class name.

    ``RedisBackend`` gives ``"redis"``, ``MemoryBackend`` ``"memory"``.

    Args:
        backend: A backend instance (``None`` gives ``"unknown"``).

    Returns:
        A lower-case name.
    """
    if backend is None:
        return "unknown"
    declared = getattr(backend, "messaging_system", None)
    if isinstance(declared, str) and declared:
        return declared
    name = type(backend).__name__
    for suffix in ("QueueBackend", "Backend"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return name.lower()


def _otlp_exporters() -> tuple[Any, Any]:
    # Imported by name: the OTLP exporter is optional and ships no type information we need.
    for transport in ("grpc", "http"):
        base = f"opentelemetry.exporter.otlp.proto.{transport}"
        try:
            spans = importlib.import_module(f"{base}.trace_exporter")
            metric_module = importlib.import_module(f"{base}.metric_exporter")
        except ImportError:
            continue
        return spans.OTLPSpanExporter(), metric_module.OTLPMetricExporter()
    raise ConfigError(
        "--otel otlp needs an OTLP exporter: pip install opentelemetry-exporter-otlp "
        "(the endpoint is read from OTEL_EXPORTER_OTLP_ENDPOINT, default localhost)"
    )


def configure_otel(
    exporter: str = "console",
    service_name: str = "resilience",
    *,
    out: IO[str] | None = None,
    metric_interval: float = 60.0,
    metric_readers: Sequence[Any] = (),
) -> Callable[[], None]:
    """Install an OpenTelemetry SDK tracer and meter provider as the global ones.

    For command lines and demos; applications usually configure the SDK themselves (the
    ``[telemetry]`` section then picks it up). Call it before the consumer starts.

    Args:
        exporter: ``console`` (spans and metrics as JSON on ``out``), ``otlp`` (to a collector,
            configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables) or ``none``.
        service_name: The ``service.name`` resource attribute.
        out: Stream for the console exporter (``sys.stderr`` by default, keeping stdout for
            program output).
        metric_interval: Seconds between metric exports (a final export runs at shutdown).
        metric_readers: More SDK metric readers for the meter provider (a Prometheus reader
            from :func:`resilience.prometheus.prometheus_metrics`).

    Returns:
        A function that flushes and shuts both providers down; call it before exiting. It
        logs export failures and never raises; calling it twice is harmless.

    Raises:
        ConfigError: an unknown exporter, the SDK or OTLP exporter is not installed, or an SDK
            is configured already in this process.
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"otel exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
    if exporter == "none":
        return lambda: None
    if tracing_configured() or metrics_configured():
        raise ConfigError(
            "an OpenTelemetry SDK is already configured in this process; "
            "telemetry uses it as it is (drop --otel)"
        )
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ConfigError(
            "--otel needs the OpenTelemetry SDK: pip install 'abe-resilience[otel]'"
        ) from None
    if exporter == "otlp":
        span_exporter, metric_exporter = _otlp_exporters()
    else:
        stream = out if out is not None else sys.stderr
        span_exporter = ConsoleSpanExporter(out=stream)
        metric_exporter = ConsoleMetricExporter(out=stream)
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    reader = PeriodicExportingMetricReader(
        metric_exporter, export_interval_millis=max(0.001, metric_interval) * 1000
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader, *metric_readers])
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    done = False

    def shutdown() -> None:
        nonlocal done
        if done:
            return
        done = True
        for name, step in (
            ("flush spans", tracer_provider.force_flush),
            ("shut the tracer provider down", tracer_provider.shutdown),
            ("shut the meter provider down", meter_provider.shutdown),
        ):
            try:
                step()
            except Exception:
                logger.warning("OpenTelemetry failed to %s", name, exc_info=True)

    return shutdown
