"""A typed view of a backend's message stream, for tests that close it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@runtime_checkable
class ClosableStream(Protocol[T_co]):
    """An async iterator with ``aclose()``, as ``consume()`` and ``deliveries()`` return."""

    def __aiter__(self) -> AsyncIterator[T_co]:
        """The stream itself."""
        ...

    def __anext__(self) -> Awaitable[T_co]:
        """The next item."""
        ...

    def aclose(self) -> Awaitable[object]:
        """Stop the stream and release what it holds."""
        ...


def closable(stream: AsyncIterator[T]) -> ClosableStream[T]:
    """``stream`` typed with the ``aclose()`` it has, so ``aclosing()`` and ``aclose()`` type-check.

    The backends' ``consume()`` and ``deliveries()`` return async generators or stream objects
    that close with ``aclose()``, but are annotated as returning ``AsyncIterator``, which has none.

    Args:
        stream: What a backend's ``consume()`` or ``deliveries()`` returned.

    Returns:
        The same object, typed as closable.

    Raises:
        AssertionError: ``stream`` has no ``aclose()``.
    """
    assert isinstance(stream, ClosableStream), f"cannot be closed: {stream!r}"
    return stream
