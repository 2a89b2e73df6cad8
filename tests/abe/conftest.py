"""Fixtures shared by the Abstract Backend tests.

Every test here is ``async def``, even the ones that await nothing: with looptime's pytest plugin
installed, a plain ``def`` test makes it call ``get_event_loop()``, which creates an event loop
that is never closed; its ``ResourceWarning`` then fails a later test (``filterwarnings=error``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend


@pytest.fixture(autouse=True)
def _fresh_shared_memory_queue() -> Iterator[None]:
    """Give every test an empty process-wide MemoryBackend queue and leave none behind."""
    MemoryBackend.reset_shared()
    yield
    MemoryBackend.reset_shared()


@pytest.fixture(autouse=True)
def _no_queue_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a QUEUE_BACKEND set in the developer's shell from steering the loader."""
    monkeypatch.delenv("QUEUE_BACKEND", raising=False)
