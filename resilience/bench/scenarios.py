"""Simulated faulty dependencies for the policy comparison.

A :class:`Scenario` decides, for every call a handler makes to the dependency, how long the call
takes (in simulated seconds) and whether it fails. Each built-in scenario is a small dataclass of
parameters; the engine creates a fresh copy per run and hands it a seeded random generator, so
the same seed always gives the same replies.

Write your own by subclassing :class:`Scenario` and overriding :meth:`Scenario.reply` (and
:meth:`Scenario.reset` if it keeps state), then pass ``--scenario package.module:MyScenario``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from resilience._config import Reader
from resilience.errors import ConfigError

__all__ = [
    "SCENARIOS",
    "DependencyDown",
    "InvalidPayload",
    "LatencySpikes",
    "Outage",
    "PartialOutage",
    "Poison",
    "RateLimited",
    "RateLimitedError",
    "Redelivery",
    "Reply",
    "Scenario",
    "Transient",
    "parse_scenario",
    "scenario_name",
]


class DependencyDown(ConnectionError):
    """The simulated dependency failed the call (transient: worth retrying)."""


class InvalidPayload(ValueError):
    """The simulated dependency rejected a poison message (it fails on every attempt)."""


class RateLimitedError(Exception):
    """The simulated dependency refused the call and said when to come back.

    Args:
        retry_after: The dependency's hint, in seconds.
    """

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"rate limited; retry after {retry_after:.3g}s")


_INTERNAL = frozenset({"rng", "label"})


@dataclass(frozen=True, slots=True)
class Reply:
    """How one call goes: it takes ``latency`` simulated seconds, then raises ``error`` if set."""

    latency: float
    error: BaseException | None = None


@dataclass(slots=True)
class Scenario:
    """A healthy dependency; the base class of every scenario.

    Args:
        latency: Typical latency of a healthy call, in seconds.
        jitter: Random spread of the latency, as a fraction of it (0.5 = +-50%).
        poison_rate: Fraction of messages that are poison: the dependency rejects them with
            :class:`InvalidPayload` on every attempt (unless it is down altogether).
    """

    name: ClassVar[str] = "healthy"
    summary: ClassVar[str] = "no faults"

    latency: float = 0.02
    jitter: float = 0.5
    poison_rate: float = 0.0
    rng: random.Random = dataclasses.field(default_factory=random.Random, repr=False, compare=False)
    label: str = dataclasses.field(default="", repr=False, compare=False)

    def reset(self, rng: random.Random) -> None:
        """Start a new run with ``rng`` (override to reset state of your own, calling super)."""
        self.rng = rng

    @property
    def recovery_at(self) -> float | None:
        """Simulated time the dependency recovers from its fault (``None``: no single recovery).

        The engine measures the time to drain the backlog from this moment.
        """
        return None

    def redelivery_timeout(self) -> float | None:
        """Seconds after which the simulated broker hands a delivery that is still not
        acknowledged to a consumer again (a visibility timeout, Redis's ``claim_idle``);
        ``None``: it never does (the default: deliveries stay with their consumer)."""
        return None

    def ack_lost(self, message_id: str | None, delivery_count: int) -> bool:
        """Whether the acknowledgement of a message's ``delivery_count``-th delivery never
        reaches the broker (the consumer died between the handler and the ack); the default:
        never."""
        return False

    def params(self) -> dict[str, Any]:
        """The scenario's parameters, for reports."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _INTERNAL and not f.name.startswith("_")
        }

    def healthy(self) -> float:
        """A latency drawn around :attr:`latency`."""
        if not self.jitter:
            return self.latency
        return max(0.0, self.latency * (1 + self.jitter * (2 * self.rng.random() - 1)))

    def reply(self, now: float, poison: bool) -> Reply:
        """The reply to a call made at simulated time ``now`` for a (possibly poison) message.

        Args:
            now: Simulated seconds since the run started.
            poison: Whether the message is one of the poison ones.

        Returns:
            The call's latency and error.
        """
        if poison:
            return Reply(self.healthy(), InvalidPayload("poison message"))
        return Reply(self.healthy())


@dataclass(slots=True)
class Transient(Scenario):
    """Every call fails independently with probability ``p`` (fast failures)."""

    name: ClassVar[str] = "transient"
    summary: ClassVar[str] = "random transient failures with probability p"

    p: float = 0.1

    def reply(self, now: float, poison: bool) -> Reply:
        """Fail with probability ``p``, else behave like a healthy dependency."""
        if self.rng.random() < self.p:
            return Reply(self.healthy(), DependencyDown("transient failure"))
        return Scenario.reply(self, now, poison)


@dataclass(slots=True)
class Outage(Scenario):
    """The dependency is down from ``start`` for ``duration`` seconds, then recovers.

    During the outage calls fail after ``error_latency`` (connection refused), or hang for
    ``hang`` seconds when ``hang`` is above zero (a black-holed connection).
    """

    name: ClassVar[str] = "outage"
    summary: ClassVar[str] = "full outage for a window, then recovery"

    start: float = 300.0
    duration: float = 3600.0
    error_latency: float = 0.005
    hang: float = 0.0

    @property
    def recovery_at(self) -> float | None:
        """The end of the outage."""
        return self.start + self.duration

    def reply(self, now: float, poison: bool) -> Reply:
        """Fail (or hang, then fail) inside the outage window."""
        if self.start <= now < self.start + self.duration:
            latency = self.hang if self.hang > 0 else self.error_latency
            return Reply(latency, DependencyDown("dependency is down"))
        return Scenario.reply(self, now, poison)


@dataclass(slots=True)
class PartialOutage(Scenario):
    """A share of the messages needs a second dependency, which is down for ``duration``
    seconds from ``start``; the other messages only need the healthy one.

    The messages flagged by ``poison_rate`` (10% by default) are the ones routed to the failing
    dependency: inside the window their calls fail after ``error_latency``; outside it, and for
    every other message, calls answer normally. The report then shows the latency of the other
    (healthy) messages and the calls made to the failing dependency.
    """

    name: ClassVar[str] = "partial_outage"
    summary: ClassVar[str] = "10% of messages need a dependency that is down for an hour"

    poison_rate: float = 0.1
    start: float = 300.0
    duration: float = 3600.0
    error_latency: float = 0.005

    @property
    def recovery_at(self) -> float | None:
        """The end of the outage."""
        return self.start + self.duration

    def reply(self, now: float, poison: bool) -> Reply:
        """Fail the flagged messages' calls inside the outage window."""
        if poison and self.start <= now < self.start + self.duration:
            return Reply(self.error_latency, DependencyDown("dependency is down"))
        return Reply(self.healthy())


@dataclass(slots=True)
class Poison(Scenario):
    """A fraction of messages is poison; the dependency is otherwise healthy."""

    name: ClassVar[str] = "poison"
    summary: ClassVar[str] = "a fraction of poison messages that fail every attempt"

    poison_rate: float = 0.05


@dataclass(slots=True)
class LatencySpikes(Scenario):
    """Every ``every`` seconds, ``spike`` seconds of ``spike_latency``; some calls hang.

    A call hangs with probability ``hang_rate`` for ``hang`` seconds and then fails: only an
    attempt timeout gets the message going again sooner.
    """

    name: ClassVar[str] = "latency"
    summary: ClassVar[str] = "periodic latency spikes and hanging calls"

    every: float = 600.0
    spike: float = 60.0
    spike_latency: float = 8.0
    hang_rate: float = 0.01
    hang: float = 300.0

    def reply(self, now: float, poison: bool) -> Reply:
        """Hang, spike, or answer normally."""
        if self.hang_rate and self.rng.random() < self.hang_rate:
            return Reply(self.hang, DependencyDown("call hung"))
        if self.every > 0 and math.fmod(now, self.every) >= self.every - self.spike:
            return Reply(self.spike_latency * (0.75 + 0.5 * self.rng.random()))
        return Scenario.reply(self, now, poison)


@dataclass(slots=True)
class RateLimited(Scenario):
    """From ``start`` for ``duration`` seconds, the dependency admits ``limit`` calls per second.

    Calls over the limit are refused at once with :class:`RateLimitedError`, whose hint is the
    time until the next one-second window (plus ``hint_extra``). The benchmark's handler turns
    it into :class:`~resilience.errors.RetryAfter`, as a real handler would.
    """

    name: ClassVar[str] = "rate_limited"
    summary: ClassVar[str] = "throttled dependency that answers with retry-after hints"

    start: float = 300.0
    duration: float = 1800.0
    limit: int = 1
    hint_extra: float = 0.0
    _window: int = dataclasses.field(default=-1, repr=False, compare=False)
    _used: int = dataclasses.field(default=0, repr=False, compare=False)

    def reset(self, rng: random.Random) -> None:
        """Forget the current window."""
        Scenario.reset(self, rng)
        self._window = -1
        self._used = 0

    @property
    def recovery_at(self) -> float | None:
        """The end of the throttling."""
        return self.start + self.duration

    def reply(self, now: float, poison: bool) -> Reply:
        """Refuse calls beyond the per-second limit inside the throttling window."""
        if self.start <= now < self.start + self.duration:
            window = int(now)
            if window != self._window:
                self._window, self._used = window, 0
            if self._used >= self.limit:
                hint = window + 1 - now + self.hint_extra
                return Reply(0.001, RateLimitedError(hint))
            self._used += 1
        return Scenario.reply(self, now, poison)


@dataclass(slots=True)
class Redelivery(Scenario):
    """A healthy dependency behind an at-least-once broker that delivers some messages twice.

    Two ways a message comes back although it was handled, as they happen in production:

    * **Lost acknowledgements**: a share ``lost_acks`` of the acknowledgements never reach the
      broker (the consumer process died, or its connection dropped, between the handler's
      return and the ack). The delivery stays unacknowledged and the broker hands it out again
      ``visibility`` seconds after it was delivered.
    * **Expired visibility**: a share ``slow_rate`` of the calls take ``slow`` seconds, longer
      than ``visibility``: the broker considers the consumer gone and hands the message to
      another consumer while the first is still running it (a visibility timeout, Redis's
      ``claim_idle``, a lease shorter than the slowest calls).

    The handler's completions are counted per message: every completion after the first is a
    duplicate (``duplicates`` in the report). An ``[idempotency]`` policy's store stands for a
    shared store (Redis, PostgreSQL) that survives the consumer's crash.
    """

    name: ClassVar[str] = "redelivery"
    summary: ClassVar[str] = "lost acknowledgements and expired visibility deliver messages twice"

    lost_acks: float = 0.02
    visibility: float = 5.0
    slow_rate: float = 0.01
    slow: float = 8.0
    _salt: float = dataclasses.field(default=0.0, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.visibility > 0:
            raise ConfigError(f"scenario redelivery.visibility must be > 0, got {self.visibility}")

    def reset(self, rng: random.Random) -> None:
        """Draw the salt of this run's lost acknowledgements."""
        Scenario.reset(self, rng)
        self._salt = rng.random()

    def redelivery_timeout(self) -> float | None:
        """The broker's visibility timeout."""
        return self.visibility

    def ack_lost(self, message_id: str | None, delivery_count: int) -> bool:
        """Lose the acknowledgement with probability ``lost_acks``, decided per message and
        delivery (not in call order), so that policies compared on one seed lose the
        acknowledgements of the same deliveries."""
        if not self.lost_acks:
            return False
        draw = random.Random(f"{self._salt}:{message_id}:{delivery_count}").random()
        return draw < self.lost_acks

    def reply(self, now: float, poison: bool) -> Reply:
        """A slow call with probability ``slow_rate``, else a healthy one."""
        if self.slow_rate and self.rng.random() < self.slow_rate:
            return Reply(self.slow)
        return Scenario.reply(self, now, poison)


SCENARIOS: dict[str, type[Scenario]] = {
    cls.name: cls
    for cls in (
        Scenario,
        Transient,
        Outage,
        PartialOutage,
        Poison,
        LatencySpikes,
        RateLimited,
        Redelivery,
    )
}
"""The built-in scenarios by name."""


def _coerce(reader: Reader, field: dataclasses.Field[Any]) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if kind == "int":
        return reader.integer(field.name, minimum=0)
    if kind == "float":
        return reader.number(field.name, minimum=0)
    if kind == "bool":
        return reader.boolean(field.name)
    return reader.get(field.name)


def build_scenario(cls: type[Scenario], params: dict[str, Any], label: str) -> Scenario:
    """Create ``cls`` with ``params``, validating names and types loudly.

    Raises:
        ConfigError: an unknown parameter, a wrong type or a negative number, named.
    """
    reader = Reader(params, label)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in _INTERNAL or field.name.startswith("_"):
            continue
        if reader.has(field.name):
            values[field.name] = _coerce(reader, field)
        else:
            reader.get(field.name, None)  # a known key: listed as allowed in error messages
    reader.finish()
    scenario = cls(**values)
    for rate in ("p", "poison_rate", "hang_rate", "lost_acks", "slow_rate"):
        value = getattr(scenario, rate, None)
        if isinstance(value, float) and value > 1:
            raise ConfigError(f"{label}.{rate} must be between 0 and 1, got {value:g}")
    return scenario


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _import_scenario(module_name: str, attr: str) -> type[Scenario]:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import scenario {module_name}:{attr} ({exc})") from None
    if not (isinstance(obj, type) and issubclass(obj, Scenario)):
        raise ConfigError(f"{module_name}:{attr} is not a subclass of resilience.bench.Scenario")
    return obj


def parse_scenario(spec: str) -> Scenario:
    """Parse ``NAME[:key=value,...]`` or ``package.module:Class[:key=value,...]``.

    Examples: ``outage``, ``outage:start=60,duration=7200``, ``transient:p=0.3``,
    ``mybench.scenarios:Flaky:p=0.2``.

    Raises:
        ConfigError: unknown scenario or parameter, or a malformed value.
    """
    parts = spec.split(":")
    if parts[0] in SCENARIOS:
        cls, rest = SCENARIOS[parts[0]], parts[1:]
    elif len(parts) >= 2 and "=" not in parts[1]:
        cls, rest = _import_scenario(parts[0], parts[1]), parts[2:]
    else:
        raise ConfigError(
            f"unknown scenario {parts[0]!r} (built in: {', '.join(SCENARIOS)}; "
            "or package.module:Class for your own)"
        )
    if len(rest) > 1:
        raise ConfigError(f"scenario {spec!r}: parameters go after one colon, as key=value,...")
    params: dict[str, Any] = {}
    for item in rest[0].split(",") if rest and rest[0] else []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"scenario {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = _parse_value(value.strip())
    scenario = build_scenario(cls, params, f"scenario {scenario_name(cls)}")
    if params:
        scenario.label = f"{scenario_name(cls)}:{rest[0]}"
    return scenario


def scenario_name(scenario: Scenario | type[Scenario]) -> str:
    """The display name: the scenario's ``label``, else its class's own ``name``, else the
    class name."""
    if isinstance(scenario, Scenario) and scenario.label:
        return scenario.label
    cls = scenario if isinstance(scenario, type) else type(scenario)
    return str(cls.__dict__.get("name", cls.__name__))
