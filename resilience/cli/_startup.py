"""What ``resilience run`` checks and says at startup: the backend choice and one startup line."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from resilience.cli import CliError
from resilience.ops.connect import broker_address
from resilience.ops.summary import policy_summary

__all__ = ["load_queue_backend", "policy_summary", "startup_fields"]

log = logging.getLogger("resilience.cli.run")


def load_queue_backend(*, allow_memory: bool, refusal: str) -> Any:
    """``load_backend()``'s backend, refusing the in-process memory fallback unless allowed.

    Without ``QUEUE_BACKEND`` (and no third-party provider installed) ``load_backend()`` falls
    back to a ``MemoryBackend`` that nothing outside this process can publish to. That is
    refused with ``refusal`` (one line, no warnings) unless ``QUEUE_BACKEND=memory`` or
    ``allow_memory`` asks for it; the backends' development-only warnings then become one log
    line each instead of raw ``UserWarning`` output.

    Args:
        allow_memory: The command was asked for the memory backend explicitly.
        refusal: The error line when the fallback is refused.

    Returns:
        The backend.

    Raises:
        CliError: the fallback was refused, or ``load_backend()`` failed (an unknown provider).
    """
    from abe.backends.message_queue.loader import load_backend
    from abe.backends.message_queue.service.memory import MemoryBackend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backend = load_backend()
        except (RuntimeError, ValueError) as exc:
            raise CliError(str(exc)) from None
    chosen = os.environ.get("QUEUE_BACKEND", "").strip()
    if isinstance(backend, MemoryBackend) and not chosen and not allow_memory:
        raise CliError(refusal)
    for warning in caught:
        log.warning("%s", warning.message)
    return backend


def startup_fields(
    backend: Any, *, group: str | None, concurrency: int, policy: Any, http: str | None
) -> dict[str, Any]:
    """The facts of the startup line, as log fields.

    Args:
        backend: The backend.
        group: The ``--group`` given (the backend's own default otherwise).
        concurrency: Messages in flight at most.
        policy: The policy in force.
        http: The health and metrics address, if served.

    Returns:
        ``version``, ``backend``, ``broker``, ``destinations``, ``group``, ``consumer``,
        ``concurrency``, ``policy``, ``http``.
    """
    from resilience import __version__
    from resilience.telemetry.setup import messaging_system

    settings = getattr(backend, "settings", None)
    streams = getattr(settings, "streams", None)
    keys = getattr(backend, "keys", None)
    destinations = list(streams or keys or ()) or ["*"]
    return {
        "version": __version__,
        "backend": messaging_system(backend),
        "broker": broker_address(backend) or None,
        "destinations": ",".join(str(d) for d in destinations),
        "group": group or getattr(settings, "group", None),
        "consumer": getattr(settings, "consumer", None),
        "concurrency": concurrency,
        "policy": policy_summary(policy),
        "http": f"http://{http}" if http else "off",
    }
