"""The ``[telemetry]`` policy section (exposed as :data:`resilience.telemetry.policy_section`).

Example TOML::

    [telemetry]
    enabled = "auto"        # true | false | "auto": on when an OpenTelemetry SDK is configured
    link_mode = "link"      # link | parent: how the process span refers to the producer's
    system = "redis"        # messaging.system; derived from the backend class by default
    service_name = "orders" # service.name when `resilience run --otel` sets the SDK up
    traces = true
    metrics = true
    log_context = false     # message ids in log lines even without OpenTelemetry

With OpenTelemetry on, :class:`~resilience.telemetry.Telemetry` puts the message in the log
context itself; ``log_context`` only matters when it is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._config import Reader
from ..errors import ConfigError
from ..logging import LogContext
from .middleware import LINK_MODES, Telemetry
from .setup import messaging_system, metrics_configured, tracing_configured

if TYPE_CHECKING:
    from ..types import BuildContext, Middleware

__all__ = ["TelemetryConfig", "policy_section"]


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """``[telemetry]``: see :class:`~resilience.telemetry.Telemetry`.

    Attributes:
        enabled: ``"auto"`` (on when an OpenTelemetry SDK provider is configured when the
            consumer starts), ``True`` (always, through the global providers) or ``False``.
        link_mode: ``"link"`` or ``"parent"`` (see :class:`~resilience.telemetry.Telemetry`).
        system: ``messaging.system``; derived from the backend class when ``None``.
        service_name: ``service.name`` for :func:`configure_otel` (``resilience run --otel``).
        traces: Emit spans (when enabled).
        metrics: Record metrics (when enabled).
        log_context: Put the message in the log context (:mod:`resilience.logging`) even
            when OpenTelemetry is off, with a :class:`~resilience.logging.LogContext` layer.
    """

    enabled: bool | str = "auto"
    link_mode: str = "link"
    system: str | None = None
    service_name: str | None = None
    traces: bool = True
    metrics: bool = True
    log_context: bool = False


class _TelemetrySection:
    """The ``[telemetry]`` section of :class:`~resilience.policy.Policy`."""

    name = "telemetry"
    order = 10

    def parse(self, reader: Reader) -> TelemetryConfig:
        """Validate ``[telemetry]``.

        Args:
            reader: The section's reader.

        Returns:
            The frozen config.

        Raises:
            ConfigError: an unknown key or a wrong value, named.
        """
        d = TelemetryConfig()
        enabled = reader.get("enabled", d.enabled)
        if not (enabled is True or enabled is False or enabled == "auto"):
            raise ConfigError(
                f'telemetry.enabled must be one of true, false, "auto"; got {enabled!r}'
            )
        system = reader.string("system", None)
        service_name = reader.string("service_name", None)
        for key, value in (("system", system), ("service_name", service_name)):
            if value is not None and not value.strip():
                raise ConfigError(f"telemetry.{key} must be a non-empty string, got {value!r}")
        config = TelemetryConfig(
            enabled=enabled,
            link_mode=reader.string("link_mode", d.link_mode, choices=LINK_MODES),
            system=system,
            service_name=service_name,
            traces=reader.boolean("traces", d.traces),
            metrics=reader.boolean("metrics", d.metrics),
            log_context=reader.boolean("log_context", d.log_context),
        )
        reader.finish()
        return config

    def to_dict(self, config: TelemetryConfig) -> dict[str, Any]:
        """Plain data (the inverse of :meth:`parse`).

        Args:
            config: A parsed config.

        Returns:
            The TOML layout, ``None`` values left out.
        """
        data = {
            "enabled": config.enabled,
            "link_mode": config.link_mode,
            "system": config.system,
            "service_name": config.service_name,
            "traces": config.traces,
            "metrics": config.metrics,
            "log_context": config.log_context,
        }
        return {k: v for k, v in data.items() if v is not None}

    def middleware(self, config: TelemetryConfig, context: BuildContext) -> Middleware | None:
        """Build the layer, deciding once whether OpenTelemetry is used at all.

        Args:
            config: The parsed section.
            context: What the policy knows about the consumer.

        Returns:
            :class:`~resilience.telemetry.Telemetry` when traces or metrics are on; else
            :class:`~resilience.logging.LogContext` when
            ``log_context``; else ``None`` (nothing per message).
        """
        if config.enabled is False:
            return LogContext() if config.log_context else None
        forced = config.enabled is True
        traces = config.traces and (forced or tracing_configured())
        metered = config.metrics and (forced or metrics_configured())
        if not traces and not metered:
            return LogContext() if config.log_context else None
        return Telemetry(
            system=config.system or messaging_system(context.backend),
            link_mode=config.link_mode,
            group=context.group,
            traces=traces,
            metrics=metered,
            events=context.events,
            clock=context.clock,
            classifier=context.classifier,
        )


policy_section = _TelemetrySection()
"""What :mod:`resilience.policy` reads ``[telemetry]`` with."""
