"""Named circuit breakers shared through a registry."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import TypedDict, Unpack

from ..clock import Clock, default_clock
from ..errors import ConfigError
from .config import BreakerConfig
from .state import Breaker
from .window import Window

__all__ = ["BreakerOptions", "BreakerRegistry", "default_registry", "get_breaker"]


class BreakerOptions(TypedDict, total=False):
    """Keyword form of :class:`BreakerConfig` (see its arguments)."""

    failure_threshold: int | None
    window: Window | None
    failure_rate: float | None
    slow_call_duration: float | timedelta | None
    slow_call_rate: float | None
    open_wait: float | timedelta
    open_wait_multiplier: float
    open_wait_max: float | timedelta
    half_open_probes: int


class BreakerRegistry:
    """Named breakers, created on first use and shared afterwards.

    A breaker is identified by its name *and* its clock: breakers on different clocks (a test's
    :class:`~resilience.clock.FakeClock` and production's loop clock) never share state.
    """

    __slots__ = ("_breakers",)

    def __init__(self) -> None:
        self._breakers: dict[tuple[str, int], Breaker] = {}

    def get(
        self, name: str, config: BreakerConfig | None = None, *, clock: Clock | None = None
    ) -> Breaker:
        """The breaker called ``name``, created with ``config`` if it does not exist yet.

        Args:
            name: The breaker's name.
            config: Its configuration; ``None`` accepts whatever an existing breaker has (or
                the defaults for a new one).
            clock: Its clock (the loop clock by default).

        Returns:
            The shared :class:`Breaker`.

        Raises:
            ConfigError: ``name`` is empty, or the breaker exists with a different config.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a breaker name must be a non-empty string, got {name!r}")
        clock = default_clock if clock is None else clock
        key = (name, id(clock))  # the breaker holds the clock, so the id stays unique
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = Breaker(
                name, BreakerConfig() if config is None else config, clock
            )
        elif config is not None and config != breaker.config:
            raise ConfigError(
                f"circuit breaker {name!r} already exists with another configuration "
                f"({breaker.config}); breakers sharing a name must agree, or use another name "
                f"(asked for {config})"
            )
        return breaker

    def find(self, name: str, *, clock: Clock | None = None) -> Breaker | None:
        """The breaker called ``name`` on ``clock``, if there is one.

        Args:
            name: The breaker's name.
            clock: Its clock (the loop clock by default).

        Returns:
            The :class:`Breaker`, or ``None``.
        """
        return self._breakers.get((name, id(default_clock if clock is None else clock)))

    def remove(self, name: str, *, clock: Clock | None = None) -> None:
        """Forget the breaker ``name`` (middleware built with it keeps using it).

        Args:
            name: The breaker's name.
            clock: Its clock (the loop clock by default).
        """
        self._breakers.pop((name, id(default_clock if clock is None else clock)), None)

    def clear(self) -> None:
        """Forget every breaker."""
        self._breakers.clear()

    def __iter__(self) -> Iterator[Breaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def __repr__(self) -> str:
        return f"BreakerRegistry({sorted(b.name for b in self._breakers.values())})"


default_registry = BreakerRegistry()
"""The registry used when none is given (by :func:`get_breaker` and the policy)."""


def get_breaker(
    name: str,
    config: BreakerConfig | None = None,
    *,
    clock: Clock | None = None,
    registry: BreakerRegistry | None = None,
    **options: Unpack[BreakerOptions],
) -> Breaker:
    """The shared breaker ``name``: ``get_breaker("payments", failure_threshold=3)``.

    Args:
        name: The breaker's name.
        config: A ready :class:`BreakerConfig` (or give its fields as keywords).
        clock: The breaker's clock (the loop clock by default).
        registry: Where to look (:data:`default_registry` by default).
        **options: :class:`BreakerConfig` fields.

    Returns:
        The :class:`Breaker`; reading ``state`` and ``stats`` or calling ``force_open()`` on
        it affects every middleware that shares it.

    Raises:
        ConfigError: invalid options, both ``config`` and options, or a conflicting config.
    """
    if options:
        if config is not None:
            raise ConfigError("pass either a BreakerConfig or keyword options, not both")
        config = BreakerConfig(**options)
    if registry is None:
        registry = default_registry
    return registry.get(name, config, clock=clock)
