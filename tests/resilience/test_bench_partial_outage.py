"""The partial_outage bench scenario: tiered retry against in-process retry, on virtual time."""

from __future__ import annotations

from resilience.bench import Workload, builtin_policies, compare, parse_scenario


def test_tiered_retry_keeps_healthy_latency_while_in_process_retry_does_not() -> None:
    """With 10% of messages on a dead dependency, tiered retry keeps the healthy 90% within 2x
    of the no-failure p99; in-process retry and the breaker do not; nothing is lost."""
    builtins = builtin_policies()
    policies = [builtins[n] for n in ("retry-long-in-process", "retry-tiered", "breaker-retry")]
    scenarios = [
        parse_scenario("partial_outage:start=60,duration=900"),
        parse_scenario("partial_outage:start=60,duration=0"),
    ]
    results = compare(policies, scenarios, Workload(messages=1500, rate=2.0, seed=3))
    by = {(r.scenario.split(":")[1], r.policy): r for r in results}
    baseline = by[("start=60,duration=0", "retry-tiered")].healthy_p99
    assert baseline is not None
    tiered = by[("start=60,duration=900", "retry-tiered")]
    in_process = by[("start=60,duration=900", "retry-long-in-process")]
    breaker = by[("start=60,duration=900", "breaker-retry")]
    assert tiered.healthy_p99 is not None
    assert tiered.healthy_p99 <= 2 * baseline
    assert in_process.healthy_p99 is not None
    assert in_process.healthy_p99 > 2 * baseline
    assert breaker.healthy_p99 is not None
    assert breaker.healthy_p99 > 2 * baseline
    assert all(r.lost == 0 and r.pending == 0 for r in results)
    assert tiered.flagged_calls > 0
