"""The loader and this distribution's own registered providers."""

from __future__ import annotations

import pytest

from abe.backends.message_queue import loader
from abe.backends.message_queue.service.memory import MemoryBackend


async def test_builtin_providers_are_registered() -> None:
    """The installed distribution registers memory and redis under the primary group."""
    names = loader.available_backends()
    assert {"memory", "redis"} <= set(names)
    assert loader._is_builtin(names["redis"])


async def test_builtin_redis_is_not_auto_selected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without QUEUE_BACKEND the built-in redis provider is skipped: memory is the fallback."""
    monkeypatch.delenv("QUEUE_BACKEND", raising=False)
    third_party = {
        name: ep for name, ep in loader.available_backends().items() if not loader._is_builtin(ep)
    }
    if third_party:
        pytest.skip(f"third-party providers installed here: {sorted(third_party)}")
    with pytest.warns(UserWarning, match="MemoryBackend"):
        backend = loader.load_backend()
    assert isinstance(backend, MemoryBackend)
