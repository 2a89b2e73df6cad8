"""Find and create the message-queue backend configured for this process."""

from __future__ import annotations

import os
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import cast

from .base import MessageQueueBackend
from .service.memory import MemoryBackend

__all__ = [
    "BACKEND_ENTRY_POINT_GROUP",
    "SERVICE_ENTRY_POINT_GROUP",
    "available_backends",
    "load_backend",
]

BACKEND_ENTRY_POINT_GROUP = "abe.backends.message_queue"
"""Entry-point group providers register in."""

SERVICE_ENTRY_POINT_GROUP = "abe.backends.message_queue.service"
"""Second group searched: published providers such as abe-redis register here."""

_MEMORY = "memory"

_BUILTIN_DISTRIBUTION = "abe-resilience"
"""This distribution: its providers (memory, redis) are used only when named."""


def _is_builtin(ep: EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return isinstance(name, str) and name.replace("_", "-").lower() == _BUILTIN_DISTRIBUTION


def available_backends() -> dict[str, EntryPoint]:
    """Return the installed providers by name.

    The primary group wins when both groups register the same name.
    """
    found: dict[str, EntryPoint] = {}
    for group in (BACKEND_ENTRY_POINT_GROUP, SERVICE_ENTRY_POINT_GROUP):
        for ep in entry_points(group=group):
            found.setdefault(ep.name, ep)
    return found


def _instantiate(name: str, ep: EntryPoint) -> MessageQueueBackend:
    try:
        backend_class = ep.load()
    except Exception as exc:
        hint = ""
        if _is_builtin(ep) and isinstance(exc, ImportError):
            hint = f" (install it with `pip install 'abe-resilience[{name}]'`)"
        raise RuntimeError(
            f"Message-queue backend {name!r} ({ep.value}) is registered but failed to import: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    from_env = getattr(backend_class, "from_env", None)
    if not callable(from_env):
        raise RuntimeError(
            f"Message-queue backend {name!r} ({ep.value}) has no from_env() classmethod"
        )
    return cast(MessageQueueBackend, from_env())


def load_backend() -> MessageQueueBackend:
    """Create the backend this process should use.

    Resolution order:

    1. ``QUEUE_BACKEND`` names a provider by entry-point name (``memory`` is always available;
       this distribution also ships ``redis``, installed with the ``redis`` extra).
    2. Otherwise the first installed third-party provider that is not ``memory`` (this
       distribution's own providers are used only when named, so installing it changes nothing
       for applications that rely on auto-selection).
    3. Otherwise :class:`MemoryBackend`, with a ``UserWarning`` (development only).

    Providers are looked up in ``abe.backends.message_queue`` and in
    ``abe.backends.message_queue.service``.

    Returns:
        The provider's ``from_env()`` instance.

    Raises:
        RuntimeError: ``QUEUE_BACKEND`` names a provider that is not installed, or a provider
            cannot be imported.
    """
    backends = available_backends()
    requested = os.getenv("QUEUE_BACKEND", "").strip()
    if requested:
        ep = backends.get(requested)
        if ep is not None:
            return _instantiate(requested, ep)
        if requested == _MEMORY:
            return MemoryBackend.from_env()
        installed = ", ".join(sorted({*backends, _MEMORY}))
        raise RuntimeError(
            f"Unknown message-queue backend {requested!r} (QUEUE_BACKEND). "
            f"Installed providers: {installed}. "
            f"Install one with `pip install abe-{requested}` (or `uv add abe-{requested}`), "
            "or unset QUEUE_BACKEND to auto-select."
        )
    for name, ep in backends.items():
        if name != _MEMORY and not _is_builtin(ep):
            return _instantiate(name, ep)
    warnings.warn(
        "No external message-queue backend is installed and QUEUE_BACKEND is not set; using "
        "MemoryBackend (development only: messages are lost on restart and stay in-process).",
        UserWarning,
        stacklevel=2,
    )
    return MemoryBackend.from_env()
