"""The failure-path rows of ``resilience bench overhead``."""

from __future__ import annotations

import gc
import weakref

import pytest

from resilience.bench._drain import gc_paused
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


class _Cycle:
    """An object in a reference cycle with itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_timed_sections_start_with_young_garbage_collected_and_no_collection_inside() -> None:
    """`gc_paused` frees the cyclic garbage made since the last collection before the block,
    keeps collection off inside it (a cycle made there survives the block) and restores the
    collector's state afterwards, also when the block raises."""
    gc.collect()
    before = weakref.ref(_Cycle())
    assert before() is not None  # a cycle: still there until the collector runs
    with gc_paused():
        assert before() is None
        assert not gc.isenabled()
        inside = weakref.ref(_Cycle())
        for _ in range(10_000):  # far past the threshold that would trigger a collection
            _Cycle()
        assert inside() is not None
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("the section failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
