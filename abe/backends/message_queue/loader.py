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


_NOTHING_REGISTERED = (
    "No message-queue backends registered. Using MemoryBackend (development only)."
)
_NO_EXTERNAL = "No external backend found — using MemoryBackend (dev only)."


def _unknown_backend(requested: str, installed: dict[str, EntryPoint]) -> RuntimeError:
    names = ", ".join(sorted({*installed, _MEMORY}))
    return RuntimeError(
        f"❌ Unknown backend '{requested}'. \n"
        f"💡 Try one of the following installation methods: \n"
        f"🔹 by pip:    pip install abe-{requested}\n"
        f"🔹 by poetry: poetry add abe-{requested}\n"
        f"🔹 by uv:     uv add abe-{requested}\n"
        f"Installed providers: {names}. Unset QUEUE_BACKEND to auto-select."
    )


def load_backend() -> MessageQueueBackend:
    """Create the backend this process should use.

    Resolution order:

    1. ``QUEUE_BACKEND`` names a provider by entry-point name (``memory`` is always available;
       this distribution also ships ``redis``, installed with the ``redis`` extra).
    2. Otherwise the first installed third-party provider that is not ``memory`` (this
       distribution's own providers are used only when named, so installing it changes nothing
       for applications that rely on auto-selection).
    3. Otherwise :class:`MemoryBackend`, with the published ``UserWarning``: "No message-queue
       backends registered. Using MemoryBackend (development only)." when no third-party
       provider is installed, "No external backend found — using MemoryBackend (dev only)." when
       the only third-party provider is a ``memory`` one.

    Providers are looked up in ``abe.backends.message_queue`` and in
    ``abe.backends.message_queue.service``. The warnings go through :mod:`warnings`, as in the
    published package (``logging.captureWarnings(True)`` routes them to logging).

    Returns:
        The provider's ``from_env()`` instance.

    Raises:
        RuntimeError: ``QUEUE_BACKEND`` names a provider that is not installed (the published
            "❌ Unknown backend '<name>'" message with the pip, poetry and uv install hints,
            followed by a line naming the installed providers), or a provider cannot be
            imported.
    """
    backends = available_backends()
    requested = os.getenv("QUEUE_BACKEND", "").strip()
    if requested:
        ep = backends.get(requested)
        if ep is not None:
            return _instantiate(requested, ep)
        if requested == _MEMORY:
            return MemoryBackend.from_env()
        raise _unknown_backend(requested, backends)
    external = {name: ep for name, ep in backends.items() if not _is_builtin(ep)}
    for name, ep in external.items():
        if name != _MEMORY:
            return _instantiate(name, ep)
    # Called as the published loader calls it (no stacklevel), so code that patches
    # ``loader.warnings`` and checks the call keeps working.
    warnings.warn(_NO_EXTERNAL if external else _NOTHING_REGISTERED, UserWarning)  # noqa: B028
    return MemoryBackend.from_env()
