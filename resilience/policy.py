"""Declarative policies: from a dict, a TOML file and environment overrides; ``@resilient``.

A policy is a frozen description; :meth:`Policy.pipeline` turns it into middleware in the
recommended order (outermost first)::

    telemetry -> dead_letter -> total timeout -> retry -> circuit_breaker -> attempt timeout

Example TOML::

    [retry]
    attempts = 5
    backoff = "full_jitter"        # fixed | exponential | full_jitter | decorrelated_jitter
    initial = 0.2                  # seconds
    maximum = 10
    max_elapsed = 60
    budget = { ratio = 0.2, min_per_second = 5 }
    in_process = 2                 # then hand retries to the broker (optional)

    [timeout]
    attempt = 2.5
    total = 30

    [classify]
    terminal = ["ValueError", "myapp.errors.InvalidOrder"]
    ignored = ["myapp.errors.Duplicate"]

Sections ``circuit_breaker``, ``dead_letter`` and ``telemetry`` are read by the modules that
implement them (:data:`SECTION_MODULES`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ._config import Reader, resolve_exception
from ._log import get_logger
from ._policy_io import apply_env, dump_toml, read_toml
from .classify import Classifier
from .clock import Clock, default_clock
from .dead_letter.envelope import EnvelopeBuilder, EnvelopeOptions
from .delivery import Delivery
from .errors import ConfigError
from .events import EventBus
from .pipeline import Pipeline
from .retry import DecorrelatedJitter, Exponential, Fixed, FullJitter, Retry, RetryBudget
from .timeout import Timeout
from .types import BuildContext, Handler, Middleware, PolicySection

if TYPE_CHECKING:
    from abe.backends.message_queue.base import MessageQueueBackend


__all__ = [
    "BuildContext",
    "ClassifyConfig",
    "Policy",
    "PolicySection",
    "RetryConfig",
    "SECTION_MODULES",
    "TimeoutConfig",
    "policy_of",
    "resilient",
]

_log = get_logger("resilience.policy")

BACKOFFS = ("fixed", "exponential", "full_jitter", "decorrelated_jitter")

ORDER_TELEMETRY = 10
ORDER_DEAD_LETTER = 20
ORDER_TOTAL_TIMEOUT = 30
ORDER_RETRY = 40
ORDER_CIRCUIT_BREAKER = 50
ORDER_ATTEMPT_TIMEOUT = 60

SECTION_MODULES: dict[str, str] = {
    "telemetry": "resilience.telemetry",
    "dead_letter": "resilience.dead_letter",
    "circuit_breaker": "resilience.breaker",
    "idempotency": "resilience.idempotency",
}
"""Policy sections implemented by other modules; each exposes ``policy_section``."""


def _section(name: str) -> PolicySection:
    module_name = SECTION_MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigError(f"policy section [{name}] is not available in this version") from None
        raise
    section: PolicySection = module.policy_section
    return section


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """``[retry.budget]``: see :class:`~resilience.retry.RetryBudget`."""

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """``[retry]``: see :class:`~resilience.retry.Retry`."""

    attempts: int = 3
    backoff: str = "exponential"
    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0
    max_elapsed: float | None = None
    max_retry_after: float = 60.0
    budget: BudgetConfig | None = None
    in_process: int | None = None
    """Attempts made in process before the broker tier (``None``: all of them)."""

    @classmethod
    def parse(cls, reader: Reader) -> RetryConfig:
        """Validate ``[retry]``."""
        d = cls()
        budget = None
        sub = reader.section("budget")
        if sub is not None:
            budget = BudgetConfig(
                ratio=sub.number("ratio", 0.2, minimum=0),
                min_per_second=sub.number("min_per_second", 10.0, minimum=0),
                window=sub.seconds("window", 10.0, positive=True),
            )
            sub.finish()
        config = cls(
            attempts=reader.integer("attempts", d.attempts, minimum=1),
            backoff=reader.string("backoff", d.backoff, choices=BACKOFFS),
            initial=reader.seconds("initial", d.initial),
            maximum=reader.seconds("maximum", d.maximum),
            multiplier=reader.number("multiplier", d.multiplier, minimum=1),
            max_elapsed=reader.seconds("max_elapsed", None, positive=True),
            max_retry_after=reader.seconds("max_retry_after", d.max_retry_after),
            budget=budget,
            in_process=reader.integer("in_process", None, minimum=1),
        )
        reader.finish()
        if config.in_process is not None and config.in_process > config.attempts:
            raise ConfigError(
                f"retry.in_process ({config.in_process}) must be from 1 to retry.attempts "
                f"({config.attempts})"
            )
        if config.maximum < config.initial:
            raise ConfigError(
                f"retry.maximum ({config.maximum:g}) must be >= retry.initial ({config.initial:g})"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        data = dataclasses.asdict(self)
        if data["max_elapsed"] is None:
            del data["max_elapsed"]
        if data["budget"] is None:
            del data["budget"]
        if data["in_process"] is None:
            del data["in_process"]
        return data

    def middleware(
        self, context: BuildContext, scrub: Callable[[str, Delivery], str] | None = None
    ) -> Retry:
        """The :class:`~resilience.retry.Retry` layer (``scrub`` masks redacted values in the
        error text carried to the broker tier)."""
        wait: Fixed | Exponential | FullJitter | DecorrelatedJitter
        if self.backoff == "fixed":
            wait = Fixed(self.initial)
        elif self.backoff == "exponential":
            wait = Exponential(self.initial, self.maximum, self.multiplier)
        elif self.backoff == "full_jitter":
            wait = FullJitter(self.initial, self.maximum, self.multiplier)
        else:
            wait = DecorrelatedJitter(self.initial, self.maximum)
        budget = None
        if self.budget is not None:
            budget = RetryBudget(
                self.budget.ratio, self.budget.min_per_second, self.budget.window, context.clock
            )
        return Retry(
            attempts=self.attempts,
            wait=wait,
            max_elapsed=self.max_elapsed,
            max_retry_after=self.max_retry_after,
            classifier=context.classifier,
            budget=budget,
            clock=context.clock,
            in_process=self.in_process,
            backend=context.backend,
            scrub=scrub,
        )


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    """``[timeout]``: ``attempt`` (per attempt) and ``total`` (whole message), in seconds."""

    attempt: float | None = 30.0
    total: float | None = None

    @classmethod
    def parse(cls, reader: Reader) -> TimeoutConfig:
        """Validate ``[timeout]`` (``0`` or ``false`` disables a limit)."""
        values: list[float | None] = []
        defaults: tuple[tuple[str, float | None], ...] = (("attempt", 30.0), ("total", None))
        for key, default in defaults:
            raw = reader.get(key, default)
            if raw is False or raw == 0:
                values.append(None)
            else:
                values.append(reader.seconds(key, default, positive=True))
        reader.finish()
        return cls(attempt=values[0], total=values[1])

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a disabled limit is written as ``0``)."""
        return {"attempt": self.attempt or 0, "total": self.total or 0}


@dataclass(frozen=True, slots=True)
class ClassifyConfig:
    """``[classify]``: exception names (``"ValueError"``, ``"pkg.mod.Error"``) per verdict."""

    retryable: tuple[str, ...] = ()
    terminal: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @classmethod
    def parse(cls, reader: Reader) -> ClassifyConfig:
        """Validate ``[classify]`` and check every name imports."""
        config = cls(
            retryable=reader.strings("retryable", ()),
            terminal=reader.strings("terminal", ()),
            ignored=reader.strings("ignored", ()),
        )
        reader.finish()
        config.classifier()
        return config

    def classifier(self) -> Classifier:
        """The :class:`~resilience.classify.Classifier` (``retryable`` defaults to Exception)."""

        def types(names: tuple[str, ...], key: str) -> tuple[type[BaseException], ...]:
            return tuple(resolve_exception(n, f"classify.{key}") for n in names)

        return Classifier(
            retryable=types(self.retryable, "retryable") or (Exception,),
            terminal=types(self.terminal, "terminal"),
            ignored=types(self.ignored, "ignored"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {k: list(v) for k, v in dataclasses.asdict(self).items() if v}


@dataclass(frozen=True, slots=True)
class Policy:
    """A declarative resilience policy.

    Args:
        retry: Retry settings; ``None`` disables retries.
        timeout: Per-attempt and total timeouts.
        classify: Which exceptions are retryable, terminal or ignored.
        sections: Parsed configs of the sections other modules implement (``circuit_breaker``,
            ``dead_letter``, ``telemetry``), by name.
    """

    retry: RetryConfig | None = field(default_factory=RetryConfig)
    timeout: TimeoutConfig = field(default_factory=TimeoutConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    sections: Mapping[str, Any] = field(default_factory=dict)

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Validate ``data`` (the TOML layout) into a policy.

        Raises:
            ConfigError: an unknown key, a wrong type or an impossible value, named.
        """
        reader = Reader(data, "")
        retry: RetryConfig | None = RetryConfig()
        if reader.has("retry"):
            raw = reader.get("retry")
            retry = None if raw is False else RetryConfig.parse(Reader(raw, "retry"))
        timeout = TimeoutConfig()
        if reader.has("timeout"):
            timeout = TimeoutConfig.parse(Reader(reader.get("timeout"), "timeout"))
        classify = ClassifyConfig()
        if reader.has("classify"):
            classify = ClassifyConfig.parse(Reader(reader.get("classify"), "classify"))
        sections: dict[str, Any] = {}
        for name in SECTION_MODULES:
            if reader.has(name):
                raw = reader.get(name)
                if raw is False or raw is None:
                    if name == "telemetry":  # keep `telemetry = false` off (it defaults on)
                        sections[name] = _section(name).parse(Reader({"enabled": False}, name))
                    continue
                sections[name] = _section(name).parse(Reader(raw, name))
        unknown = sorted(set(data) - {"retry", "timeout", "classify", *SECTION_MODULES})
        if unknown:
            raise ConfigError(
                f"unknown policy section{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
                f"(allowed: retry, timeout, classify, {', '.join(SECTION_MODULES)})"
            )
        return cls(retry=retry, timeout=timeout, classify=classify, sections=sections)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Policy:
        """Load a TOML policy file.

        Raises:
            ConfigError: the file is missing, not valid TOML, or not a valid policy.
        """
        return cls.from_dict(read_toml(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        prefix: str = "RESILIENCE_",
    ) -> Policy:
        """TOML file (optional) with environment overrides applied on top.

        ``RESILIENCE_RETRY__ATTEMPTS=5`` sets ``retry.attempts``; ``__`` separates levels and
        values are parsed as JSON when they can be (numbers, booleans, lists), else kept as text.
        """
        data: dict[str, Any] = read_toml(path) if path is not None else {}
        apply_env(data, os.environ if environ is None else environ, prefix)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the TOML layout; ``Policy.from_dict(p.to_dict()) == p``."""
        data: dict[str, Any] = {
            "retry": False if self.retry is None else self.retry.to_dict(),
            "timeout": self.timeout.to_dict(),
        }
        classify = self.classify.to_dict()
        if classify:
            data["classify"] = classify
        for name, config in self.sections.items():
            data[name] = _section(name).to_dict(config)
        return data

    def to_toml(self) -> str:
        """The policy as a TOML document that :meth:`from_toml` reads back."""
        return dump_toml(self.to_dict())

    # -- building ----------------------------------------------------------------------------------

    def classifier(self) -> Classifier:
        """The shared failure classifier."""
        return self.classify.classifier()

    def _scrub(self) -> Callable[[str, Delivery], str] | None:
        """How error texts handed to the broker tier are redacted: as in dead-letter envelopes."""
        if self.retry is None or self.retry.in_process is None:
            return None
        config = self.sections.get("dead_letter")
        redact = getattr(config, "redact", None)
        options = EnvelopeOptions(redact=redact) if redact is not None else EnvelopeOptions()
        return EnvelopeBuilder(options).scrub

    def layers(
        self,
        *,
        clock: Clock | None = None,
        backend: MessageQueueBackend | None = None,
        group: str | None = None,
        handler: Handler | None = None,
        events: EventBus | None = None,
    ) -> list[Middleware]:
        """The middleware, outermost first, in the recommended order."""
        context = BuildContext(
            clock=clock or default_clock,
            classifier=self.classifier(),
            backend=backend,
            group=group,
            handler=handler,
            events=events,
        )
        ordered: list[tuple[int, Middleware]] = []
        if self.timeout.total is not None:
            ordered.append(
                (ORDER_TOTAL_TIMEOUT, Timeout(self.timeout.total, total=True, clock=context.clock))
            )
        if self.retry is not None:
            ordered.append((ORDER_RETRY, self.retry.middleware(context, self._scrub())))
        if self.timeout.attempt is not None:
            ordered.append(
                (ORDER_ATTEMPT_TIMEOUT, Timeout(self.timeout.attempt, clock=context.clock))
            )
        sections = dict(self.sections)
        if "telemetry" not in sections:
            # On by default: with enabled = "auto" it adds no layer unless an OpenTelemetry
            # SDK is configured when the consumer starts.
            sections["telemetry"] = _section("telemetry").parse(Reader({}, "telemetry"))
        for name, config in sections.items():
            section = _section(name)
            layer = section.middleware(config, context)
            if layer is not None:
                ordered.append((section.order, layer))
        ordered.sort(key=lambda item: item[0])
        self._warn_about_foot_guns()
        return [layer for _, layer in ordered]

    def _warn_about_foot_guns(self) -> None:
        """Log combinations that work but defeat their purpose (once per build)."""
        breaker = self.sections.get("circuit_breaker")
        if breaker is None or getattr(breaker, "mode", None) != "pause" or self.retry is None:
            return
        config = breaker.breaker
        threshold = config.failure_threshold
        if threshold and threshold > self.retry.attempts:
            _log.warning(
                f"breaker_opens_after_retries_exhausted: circuit_breaker {breaker.name!r} has "
                f"failure_threshold {threshold} > retry.attempts {self.retry.attempts}, so at "
                "the start of an outage a message runs out of attempts before the breaker "
                "opens and holds it; set failure_threshold <= retry.attempts",
                breaker=breaker.name,
                failure_threshold=threshold,
                retry_attempts=self.retry.attempts,
            )
        if self.timeout.total is not None:
            _log.warning(
                f"total_timeout_ends_held_messages: a message held by the paused circuit_breaker "
                f"{breaker.name!r} ends with TotalTimeout (and is dead-lettered) when an outage "
                f"outlasts timeout.total ({self.timeout.total:g}s)",
                breaker=breaker.name,
                total=self.timeout.total,
            )

    def pipeline(
        self,
        *,
        clock: Clock | None = None,
        backend: MessageQueueBackend | None = None,
        group: str | None = None,
        handler: Handler | None = None,
        events: EventBus | None = None,
    ) -> Pipeline:
        """A new :class:`~resilience.pipeline.Pipeline` for this policy."""
        layers = self.layers(
            clock=clock, backend=backend, group=group, handler=handler, events=events
        )
        return Pipeline(*layers)


# -- @resilient: a policy declared on the handler itself ------------------------------------

H = TypeVar("H", bound=Callable[[dict[str, Any]], Awaitable[None]])

_POLICY_ATTR = "__resilience_policy__"
_WRAPPED_ATTR = "__resilience_handler__"


def resilient(
    policy: Policy | Mapping[str, Any] | None = None,
    *,
    clock: Clock | None = None,
    **sections: Any,
) -> Callable[[H], H]:
    """Wrap ``async def handler(payload)`` with a policy, declaratively.

    ``@resilient(retry={"attempts": 5}, timeout={"attempt": 2})`` builds the policy from
    keyword sections (the TOML layout); ``@resilient(Policy.from_toml("policy.toml"))`` takes a
    ready one. Calling the decorated function runs the whole pipeline around the call; handing
    it to :class:`~resilience.consumer.ResilientConsumer` or ``resilience run`` makes the
    consumer use the policy (and settle messages by its outcome) instead.

    Raises:
        ConfigError: the policy is invalid (at decoration time).
    """
    if policy is None:
        resolved = Policy.from_dict(sections)
    elif isinstance(policy, Policy):
        if sections:
            raise ConfigError("pass either a Policy or keyword sections to @resilient, not both")
        resolved = policy
    else:
        resolved = Policy.from_dict({**policy, **sections})

    def decorate(handler: H) -> H:
        the_clock = clock or default_clock
        call = resolved.pipeline(clock=the_clock, handler=handler).build(handler)

        @functools.wraps(handler)
        async def wrapper(payload: dict[str, Any]) -> None:
            await call(Delivery(payload, started_at=the_clock.monotonic()))

        setattr(wrapper, _POLICY_ATTR, resolved)
        setattr(wrapper, _WRAPPED_ATTR, handler)
        return wrapper  # type: ignore[return-value]

    return decorate


def policy_of(handler: Handler) -> tuple[Policy | None, Handler]:
    """The policy ``@resilient`` attached to ``handler`` and the undecorated handler."""
    policy = getattr(handler, _POLICY_ATTR, None)
    if isinstance(policy, Policy):
        return policy, getattr(handler, _WRAPPED_ATTR)
    return None, handler
