"""Smoke tests of the scaling rows of ``resilience bench overhead`` (tiny sizes, no timing)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from resilience.bench import scaling
from resilience.bench.scaling import (
    KEY_COUNTS,
    format_scaling,
    measure_dead_letters,
    measure_scaling,
)


def test_scaling_rows_cover_every_key_count_and_the_dead_letter_writers() -> None:
    """measure_scaling reports each key contender at 1, 100 and 1,000 keys, read as a whole
    and by name, one ratio per row, the three dead-letter writers, and the tables name them
    all."""
    report = measure_scaling(300, 1)
    keys, dead = report["keys"], report["dead_letters"]
    assert list(keys["per_message_us"]) == [
        *scaling.KEY_CONTENDERS,
        *(f"{name}, named keys" for name in scaling.KEY_CONTENDERS),
    ]
    for costs in keys["per_message_us"].values():
        assert sorted(costs, key=int) == [str(k) for k in KEY_COUNTS]
        assert all(cost > 0 for cost in costs.values())
    assert [r["name"] for r in keys["ratios"]] == [
        *(f"{name}: 1000 keys / 1 key" for name in scaling.KEY_CONTENDERS),
        *(f"{name}, named keys: 1000 named keys / 1 key" for name in scaling.KEY_CONTENDERS),
    ]
    assert set(dead["per_second"]) == {
        "consumer, group commit",
        "store alone, group commit",
        "store alone, one commit per envelope",
    }
    text = format_scaling(keys, dead)
    assert "1000 keys" in text
    assert "bare, named keys: 1000 named keys / 1 key" in text
    assert "dead letters per second (SQLite, synchronous=FULL)" in text


async def test_dead_letter_run_refuses_a_count_that_does_not_add_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that settles messages without storing their dead letters fails the run
    instead of reporting a rate."""
    from resilience.dead_letter import SQLiteStore

    async def lose(self: SQLiteStore, envelope: Any, delivery: Any = None) -> None:
        return None

    monkeypatch.setattr(SQLiteStore, "write", lose)
    with pytest.raises(RuntimeError, match="stored 0 of 20"):
        await scaling._dead_letter_run(20, 4, tmp_path)


async def test_dead_letter_rows_run_in_a_running_loop() -> None:
    """measure_dead_letters is a coroutine usable from a running loop; every writer has a rate."""
    dead = await asyncio.wait_for(measure_dead_letters(30, 1, concurrency=4), 60)
    assert dead["concurrency"] == 4
    assert all(rate > 0 for rate in dead["per_second"].values())


@pytest.mark.broker
def test_stream_count_rows_drain_everything_at_each_count() -> None:
    """The stream-count rows drain 1, 100 and 1,000 streams with both contenders, leave
    nothing pending and report one ratio per count."""
    import os

    from resilience.bench.redis_streams import STREAM_COUNTS, format_streams
    from resilience.bench.redis_throughput import RedisUnavailable, _stream_counts

    url = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/0")
    try:
        report = asyncio.run(_stream_counts(url, 1200, 1))
    except RedisUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{exc}; CI=true, so broker tests must run")
        pytest.skip(str(exc))
    for rates in report["messages_per_second"].values():
        assert sorted(rates, key=int) == [str(c) for c in STREAM_COUNTS]
        assert all(rate > 0 for rate in rates.values())
    assert set(report["unacknowledged_after_drain"].values()) == {0}
    assert [r["name"] for r in report["ratios"]] == [
        f"ResilientConsumer / hand-written, {c} streams" for c in STREAM_COUNTS
    ]
    assert "1000 streams" in format_streams(report)
