"""OpenTelemetry traces and metrics for every message, following the messaging conventions.

See :mod:`resilience.telemetry.middleware` for what the :class:`Telemetry` layer records.
"""

from __future__ import annotations

from .middleware import LINK_MODES, Telemetry
from .publish import inject_context, publish_with_context
from .section import TelemetryConfig, policy_section
from .setup import (
    SCHEMA_URL,
    configure_otel,
    messaging_system,
    metrics_configured,
    tracing_configured,
)

__all__ = [
    "LINK_MODES",
    "SCHEMA_URL",
    "Telemetry",
    "TelemetryConfig",
    "configure_otel",
    "inject_context",
    "messaging_system",
    "metrics_configured",
    "policy_section",
    "publish_with_context",
    "tracing_configured",
]
