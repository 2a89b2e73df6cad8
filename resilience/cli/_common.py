"""Shared pieces of the CLI commands."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from resilience.cli import CliError
from resilience.errors import ConfigError
from resilience.policy import Policy

__all__ = ["import_handler", "load_policy", "quiet_logs", "setup_otel"]


def quiet_logs(*, verbose: bool) -> None:
    """Readable log lines on stderr when ``verbose``; otherwise only critical ones (the
    command's own summary reports what the per-message error lines would say)."""
    import logging

    from resilience.logging import configure_logging

    configure_logging("console", level=logging.INFO if verbose else logging.CRITICAL)


def import_handler(spec: str) -> Callable[[dict[str, Any]], Any]:
    """Import ``package.module:function`` (the current directory is importable).

    Raises:
        CliError: the spec is malformed, the module or attribute is missing, or it is not an
            ``async def`` handler.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"handler must look like MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CliError(f"cannot import module {module_name!r}: {exc}") from None
        raise CliError(f"importing {module_name!r} failed: {exc}") from None
    except Exception as exc:
        raise CliError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    target = getattr(obj, "__resilience_handler__", obj)
    if not callable(obj) or not (
        inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(obj)
    ):
        raise CliError(f"{spec} must be an async function: async def handler(payload): ...")
    _check_signature(spec, target)
    handler: Callable[[dict[str, Any]], Any] = obj
    return handler


def _check_signature(spec: str, target: Any) -> None:
    """Refuse a handler that cannot be called with one positional payload argument."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # nothing to check (a builtin or an unusual callable): the call will tell
    try:
        signature.bind({})
    except TypeError as exc:
        raise CliError(
            f"{spec} cannot take one payload argument ({exc}): "
            "the handler is called as await handler(payload)"
        ) from None


def load_policy(path: str | None) -> Policy:
    """The policy from ``path`` (optional) with ``RESILIENCE_*`` environment overrides.

    Raises:
        CliError: the policy is invalid (one line naming the key).
    """
    try:
        return Policy.load(path)
    except ConfigError as exc:
        raise CliError(f"invalid policy: {exc}") from None


def setup_otel(
    exporter: str | None,
    service_name: str,
    *,
    out: Any = None,
    metric_readers: Sequence[Any] = (),
) -> Callable[[], None]:
    """Configure an OpenTelemetry SDK exporter for the command; returns its shutdown function.

    Args:
        exporter: ``console``, ``otlp``, or ``None`` (none: only ``metric_readers``, if any).
        service_name: The ``service.name`` resource attribute.
        out: Stream of the console exporter.
        metric_readers: More metric readers (the Prometheus reader of ``--http``).

    Raises:
        CliError: telemetry support or the exporter is not installed.
    """
    if not exporter and not metric_readers:
        return lambda: None
    if not exporter:
        from opentelemetry import metrics

        from resilience.telemetry.setup import metrics_configured

        if metrics_configured():
            raise CliError("an OpenTelemetry SDK is already configured in this process")
        try:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.resources import Resource
        except ImportError:
            raise CliError(
                "metrics need the OpenTelemetry SDK: pip install 'abe-resilience[http]'"
            ) from None
        provider = MeterProvider(
            resource=Resource.create({"service.name": service_name}),
            metric_readers=list(metric_readers),
        )
        metrics.set_meter_provider(provider)
        return lambda: provider.shutdown()
    try:
        configure_otel = importlib.import_module("resilience.telemetry").configure_otel
    except (ImportError, AttributeError) as exc:
        raise CliError(
            f"--otel needs the telemetry support (pip install 'abe-resilience[otel]'): {exc}"
        ) from None
    try:
        shutdown: Callable[[], None] = configure_otel(
            exporter, service_name, out=out, metric_readers=metric_readers
        )
        return shutdown
    except (ImportError, ValueError) as exc:
        raise CliError(str(exc)) from None
