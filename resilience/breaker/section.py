"""The ``[circuit_breaker]`` section of a declarative policy.

Example TOML::

    [circuit_breaker]
    name = "payments-api"          # equal names share one breaker
    mode = "pause"                 # pause | fail_fast
    failure_threshold = 3          # consecutive failures (0: off)
    window = { type = "count", size = 50, minimum_calls = 20 }   # or type = "time", size = 60
    failure_rate = 0.5             # of the window's calls
    slow_call_duration = 2.0       # seconds
    slow_call_rate = 0.8
    open_wait = 10                 # seconds, then half-open
    open_wait_multiplier = 2       # growth on repeated trips
    open_wait_max = 300
    half_open_probes = 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .config import BreakerConfig
from .middleware import CircuitBreaker, Mode
from .registry import default_registry
from .window import CountWindow, TimeWindow, Window

if TYPE_CHECKING:
    from .._config import Reader
    from ..types import BuildContext

__all__ = ["CircuitBreakerConfig", "policy_section"]

_MODES = ("pause", "fail_fast")
_WINDOW_TYPES = ("count", "time")


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """``[circuit_breaker]``: a breaker name, the middleware mode and the breaker's config."""

    name: str = "default"
    mode: str = "pause"
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


def _window(reader: Reader | None) -> Window | None:
    if reader is None:
        return None
    kind = reader.string("type", "count", choices=_WINDOW_TYPES)
    window: Window
    if kind == "count":
        window = CountWindow(
            size=reader.integer("size", 100, minimum=1),
            minimum_calls=reader.integer("minimum_calls", None, minimum=1),
        )
    else:
        window = TimeWindow(
            size=reader.seconds("size", 60.0, positive=True),
            minimum_calls=reader.integer("minimum_calls", 10, minimum=1),
            buckets=reader.integer("buckets", 10, minimum=1),
        )
    reader.finish()
    return window


class _Section:
    """Implements :class:`~resilience.policy.PolicySection` for ``[circuit_breaker]``."""

    name = "circuit_breaker"
    order = 50

    def parse(self, reader: Reader) -> CircuitBreakerConfig:
        """Validate ``[circuit_breaker]``.

        Args:
            reader: The section's reader.

        Returns:
            The frozen :class:`CircuitBreakerConfig`.

        Raises:
            ConfigError: an unknown key, a wrong type, or values that cannot work together.
        """
        d = BreakerConfig()
        name = reader.string("name", "default")
        if not name:
            raise ConfigError("circuit_breaker.name must be a non-empty string")
        mode = reader.string("mode", "pause", choices=_MODES)
        threshold = reader.get("failure_threshold", d.failure_threshold)
        if threshold is False:
            threshold = 0
        else:
            threshold = reader.integer("failure_threshold", d.failure_threshold, minimum=0)
        window = _window(reader.section("window"))
        options: dict[str, Any] = {
            "failure_threshold": threshold,
            "window": window,
            "failure_rate": reader.number("failure_rate", None),
            "slow_call_duration": reader.seconds("slow_call_duration", None, positive=True),
            "slow_call_rate": reader.number("slow_call_rate", None),
            "open_wait": reader.seconds("open_wait", d.open_wait, positive=True),
            "open_wait_multiplier": reader.number(
                "open_wait_multiplier", d.open_wait_multiplier, minimum=1
            ),
            "open_wait_max": reader.seconds("open_wait_max", d.open_wait_max, positive=True),
            "half_open_probes": reader.integer("half_open_probes", d.half_open_probes, minimum=1),
        }
        reader.finish()
        try:
            breaker = BreakerConfig(**options)
        except ConfigError as exc:
            raise ConfigError(f"circuit_breaker: {exc}") from None
        return CircuitBreakerConfig(name=name, mode=mode, breaker=breaker)

    def to_dict(self, config: CircuitBreakerConfig) -> dict[str, Any]:
        """The section as plain data; ``parse`` reads it back to an equal config.

        Args:
            config: A parsed section.

        Returns:
            A mapping in the TOML layout.
        """
        b = config.breaker
        data: dict[str, Any] = {
            "name": config.name,
            "mode": config.mode,
            "failure_threshold": b.failure_threshold or 0,
        }
        window = b.window
        if isinstance(window, CountWindow):
            data["window"] = {
                "type": "count",
                "size": window.size,
                "minimum_calls": window.minimum_calls,
            }
        elif isinstance(window, TimeWindow):
            data["window"] = {
                "type": "time",
                "size": window.size,
                "minimum_calls": window.minimum_calls,
                "buckets": window.buckets,
            }
        if window is not None:
            data["failure_rate"] = b.failure_rate
        if b.slow_call_duration is not None:
            data["slow_call_duration"] = b.slow_call_duration
            data["slow_call_rate"] = b.slow_call_rate
        data.update(
            {key: getattr(b, key) for key in ("open_wait", "open_wait_multiplier", "open_wait_max")}
        )
        data["half_open_probes"] = b.half_open_probes
        return data

    def middleware(self, config: CircuitBreakerConfig, context: BuildContext) -> CircuitBreaker:
        """The :class:`~resilience.breaker.CircuitBreaker` for ``config``.

        The breaker comes from :data:`~resilience.breaker.default_registry`, keyed by name and
        the context's clock, so every policy naming the same breaker shares its state.

        Args:
            config: A parsed section.
            context: The clock, classifier and event bus of the consumer being built.

        Returns:
            The middleware.

        Raises:
            ConfigError: a breaker of that name already exists with another config.
        """
        breaker = default_registry.get(config.name, config.breaker, clock=context.clock)
        mode: Mode = "fail_fast" if config.mode == "fail_fast" else "pause"
        return CircuitBreaker(
            breaker, mode=mode, classifier=context.classifier, events=context.events
        )

    def __repr__(self) -> str:
        return "policy_section(circuit_breaker)"


policy_section = _Section()
"""The ``[circuit_breaker]`` policy section (see :data:`resilience.policy.SECTION_MODULES`)."""
