"""The async-generator view of a backend's ``consume()`` stream, for tests that close it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


def closable(stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """``stream`` as the async generator it is, so ``aclosing()`` and ``aclose()`` type-check.

    Every backend's ``consume()`` is an async generator function (published behaviour) but is
    annotated as returning ``AsyncIterator``, which has no ``aclose()``.

    Args:
        stream: What a backend's ``consume()`` returned.

    Returns:
        The same object, typed as an async generator.

    Raises:
        AssertionError: ``stream`` is not an async generator.
    """
    assert isinstance(stream, AsyncGenerator), f"not an async generator: {stream!r}"
    return stream
