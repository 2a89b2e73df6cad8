"""The failure-path rows of ``resilience bench overhead``."""

from __future__ import annotations

from resilience.bench.failures import FAIL_SHARES, format_failures, measure_failures


def test_failure_rows_measure_every_share_and_the_cost_per_retry() -> None:
    """Each contender gets a cost at 0%, 10% and 100% fail-once traffic, and a per-retry cost
    compared with tenacity's own loop."""
    report = measure_failures(200, 1)
    shares = [str(s) for s in FAIL_SHARES]
    assert set(report["per_message_us"]) == {"bare+tenacity", "Retry alone", "Policy()"}
    assert set(report["per_call_us"]) == {"tenacity AsyncRetrying", "Retry"}
    for group in ("per_message_us", "per_call_us"):
        for name, costs in report[group].items():
            assert list(costs) == shares
            assert all(cost > 0 for cost in costs.values())
            assert report["per_retry_us"][name] == costs["100"] - costs["0"]
    names = [r["name"] for r in report["ratios"]]
    assert names == [
        "per retry: Retry alone / tenacity",
        "per retry: Policy() / tenacity",
        "per retry: Retry (no consumer) / tenacity",
    ]
    text = format_failures(report)
    assert "per retry" in text
    assert "bare+tenacity" in text
