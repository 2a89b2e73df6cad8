"""Benchmarks as a library: policy comparison on virtual time, overhead, memory, throughput.

``resilience bench ...`` and the scripts in ``benchmarks/`` are thin front ends to this package.
The policy comparison is importable for users' own experiments::

    from resilience.bench import Workload, builtin_policies, compare, parse_scenario

    results = compare(
        list(builtin_policies().values()),
        [parse_scenario("outage:duration=3600")],
        Workload(messages=10_000, seed=7),
    )
"""

from __future__ import annotations

from ._vloop import SimulationStalled, VirtualTimeLoop, run_virtual
from .policies import NamedPolicy, builtin_policies, load_policy
from .scenarios import (
    SCENARIOS,
    DependencyDown,
    InvalidPayload,
    RateLimitedError,
    Reply,
    Scenario,
    parse_scenario,
)
from .simulate import RunResult, Workload, compare, simulate

__all__ = [
    "SCENARIOS",
    "DependencyDown",
    "InvalidPayload",
    "NamedPolicy",
    "RateLimitedError",
    "Reply",
    "RunResult",
    "Scenario",
    "SimulationStalled",
    "VirtualTimeLoop",
    "Workload",
    "builtin_policies",
    "compare",
    "load_policy",
    "parse_scenario",
    "run_virtual",
    "simulate",
]
