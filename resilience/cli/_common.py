"""Shared pieces of the CLI commands."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
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
    handler: Callable[[dict[str, Any]], Any] = obj
    return handler


def load_policy(path: str | None) -> Policy:
    """The policy from ``path`` (optional) with ``RESILIENCE_*`` environment overrides.

    Raises:
        CliError: the policy is invalid (one line naming the key).
    """
    try:
        return Policy.load(path)
    except ConfigError as exc:
        raise CliError(f"invalid policy: {exc}") from None


def setup_otel(exporter: str | None, service_name: str, *, out: Any = None) -> Callable[[], None]:
    """Configure an OpenTelemetry SDK exporter for the command; returns its shutdown function.

    Raises:
        CliError: telemetry support or the exporter is not installed.
    """
    if not exporter:
        return lambda: None
    try:
        configure_otel = importlib.import_module("resilience.telemetry").configure_otel
    except (ImportError, AttributeError) as exc:
        raise CliError(
            f"--otel needs the telemetry support (pip install 'abe-resilience[otel]'): {exc}"
        ) from None
    try:
        shutdown: Callable[[], None] = configure_otel(exporter, service_name, out=out)
        return shutdown
    except (ImportError, ValueError) as exc:
        raise CliError(str(exc)) from None
