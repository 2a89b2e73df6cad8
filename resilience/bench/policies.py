"""Named policies for the comparison: built-in ones and users' TOML files.

A policy is given as a built-in name (``no-retry``, ``retry-exponential``, ...), as the path of
a TOML file that ``resilience run --policy`` also takes (named after the file), or as
``NAME=PATH`` to choose the label. Every built-in ``NAME`` also comes as ``NAME-idempotent``:
the same policy with an ``[idempotency]`` section (a memory store on the run's virtual clock).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resilience.errors import ConfigError
from resilience.policy import SECTION_MODULES, Policy

__all__ = [
    "DEFAULT_POLICIES",
    "NamedPolicy",
    "builtin_policies",
    "has_section",
    "load_policy",
]

_DEAD_LETTER = {"destination": "backend"}
"""Dead letters go to ``<key>.dlq`` on the benchmark's in-memory backend (atomic with the ack)."""

_ATTEMPT_TIMEOUT = {"attempt": 10.0}

_IDEMPOTENT = "-idempotent"
"""Suffix of the built-ins' variants with an ``[idempotency]`` section."""

_IDEMPOTENCY = {"store": "memory"}
"""The variants' section: a memory store on the consumer's clock (the run's virtual time),
standing for a shared store that survives a consumer's crash."""

_BUILTINS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("no-retry", "the baseline: one attempt, no retry", {"retry": False}),
    (
        "retry-exponential",
        "5 attempts, exponential backoff 0.5 s doubling to 60 s, every error retryable",
        {
            "retry": {"attempts": 5, "backoff": "exponential", "initial": 0.5, "maximum": 60},
        },
    ),
    (
        "retry-jitter-budget",
        "5 attempts, full jitter, retry budget of 20% (+1/s); ValueError is terminal",
        {
            "retry": {
                "attempts": 5,
                "backoff": "full_jitter",
                "initial": 0.5,
                "maximum": 60,
                "budget": {"ratio": 0.2, "min_per_second": 1.0},
            },
            "classify": {"terminal": ["ValueError"]},
        },
    ),
    (
        "retry-patient",
        "up to 40 attempts over 2 h, decorrelated jitter 1-300 s; ValueError is terminal",
        {
            "retry": {
                "attempts": 40,
                "backoff": "decorrelated_jitter",
                "initial": 1.0,
                "maximum": 300,
                "max_elapsed": 7200,
            },
            "classify": {"terminal": ["ValueError"]},
        },
    ),
)

_TIERED_BUILTINS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "retry-long-in-process",
        "12 attempts over about an hour, exponential 1 s doubling to 600 s, all waits in process",
        {"retry": {"attempts": 12, "backoff": "exponential", "initial": 1.0, "maximum": 600}},
    ),
    (
        "retry-tiered",
        "the same 12 attempts: 2 in process, then each wait held by the broker (slot freed)",
        {
            "retry": {
                "attempts": 12,
                "in_process": 2,
                "backoff": "exponential",
                "initial": 1.0,
                "maximum": 600,
            },
        },
    ),
)

_BREAKER_BUILTINS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "breaker-retry",
        "circuit breaker in front of 5 exponential attempts; ValueError is terminal",
        {
            "retry": {"attempts": 5, "backoff": "exponential", "initial": 0.5, "maximum": 60},
            "circuit_breaker": {},
            "classify": {"terminal": ["ValueError"]},
        },
    ),
)

DEFAULT_POLICIES = ("no-retry", "retry-exponential", "retry-jitter-budget", "breaker-retry")
"""What ``resilience bench policies`` compares when no ``--policy`` is given (those available)."""


def has_section(name: str) -> bool:
    """Whether the module implementing policy section ``name`` is installed and usable."""
    module_name = SECTION_MODULES.get(name)
    if module_name is None:
        return False
    try:
        module = importlib.import_module(module_name)
    except Exception:  # missing, or broken in this installation: the section is unavailable
        return False
    return hasattr(module, "policy_section")


@dataclass(frozen=True, slots=True)
class NamedPolicy:
    """A policy with the label the reports use.

    Attributes:
        name: The label.
        policy: The validated policy.
        description: One line for ``--list`` and the JSON report.
        source: ``"built-in"`` or the TOML file's path.
    """

    name: str
    policy: Policy
    description: str = ""
    source: str = "built-in"

    @property
    def dead_letters(self) -> bool:
        """Whether the policy routes terminal failures to a dead-letter destination."""
        return "dead_letter" in self.policy.sections

    @property
    def has_breaker(self) -> bool:
        """Whether the policy has a circuit breaker."""
        return "circuit_breaker" in self.policy.sections


def _with_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"timeout": dict(_ATTEMPT_TIMEOUT), **data}
    if has_section("dead_letter"):
        out.setdefault("dead_letter", dict(_DEAD_LETTER))
    return out


def in_memory_dead_letters(policy: Policy) -> Policy:
    """``policy`` with its dead letters sent to the benchmark's in-memory backend, and its
    idempotency records kept in memory.

    A comparison must not write thousands of simulated dead letters or idempotency records into
    a real store (a policy file's SQLite database, say), so the destination and the store are
    replaced; every other option is kept.
    """
    if "dead_letter" not in policy.sections and "idempotency" not in policy.sections:
        return policy
    data = policy.to_dict()
    if "dead_letter" in data:
        section = dict(data["dead_letter"])
        section["destination"] = "backend"
        section.pop("path", None)
        section.pop("key", None)
        section["key_suffix"] = ".dlq"
        data["dead_letter"] = section
    if isinstance(data.get("idempotency"), dict) and data["idempotency"].get("enabled", True):
        idempotency = dict(data["idempotency"])
        for option in ("path", "url", "table"):
            idempotency.pop(option, None)
        data["idempotency"] = {**idempotency, **_IDEMPOTENCY}
    return Policy.from_dict(data)


def builtin_policies() -> dict[str, NamedPolicy]:
    """The built-in policies available in this installation, by name.

    Policies that need a section whose module is missing (``breaker-retry`` before the circuit
    breaker is installed) are left out; every built-in dead-letters when dead-letter routing is
    available; each comes with its ``-idempotent`` variant when the idempotency layer is.
    """
    specs = list(_BUILTINS) + list(_TIERED_BUILTINS)
    if has_section("circuit_breaker"):
        specs.extend(_BREAKER_BUILTINS)
    idempotency = has_section("idempotency")
    result = {}
    for name, description, data in specs:
        full = _with_defaults(data)
        result[name] = NamedPolicy(name, Policy.from_dict(full), description)
        if idempotency:
            variant = {**full, "idempotency": dict(_IDEMPOTENCY)}
            result[name + _IDEMPOTENT] = NamedPolicy(
                name + _IDEMPOTENT,
                Policy.from_dict(variant),
                f"{name} plus [idempotency] (memory store): a completed message runs once",
            )
    return result


def load_policy(spec: str) -> NamedPolicy:
    """Resolve a built-in name, ``PATH.toml`` or ``NAME=PATH.toml``.

    Raises:
        ConfigError: unknown name, missing file or invalid policy (naming the key).
    """
    builtins = builtin_policies()
    if spec in builtins:
        return builtins[spec]
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    if not path.endswith(".toml") and not Path(path).exists():
        missing = ""
        if spec == "breaker-retry":
            missing = " (needs the circuit breaker, which this installation lacks)"
        raise ConfigError(
            f"unknown policy {spec!r}{missing}: use one of {', '.join(builtins)}, "
            "a TOML file, or NAME=FILE.toml"
        )
    try:
        policy = Policy.from_toml(path)
    except ConfigError as exc:
        raise ConfigError(f"policy {name!r}: {exc}") from None
    return NamedPolicy(name, in_memory_dead_letters(policy), f"from {path}", path)
