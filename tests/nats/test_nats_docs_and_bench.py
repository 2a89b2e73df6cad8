"""docs/nats.md's example runs, and ``bench brokers`` runs on NATS."""

from __future__ import annotations

import pytest

from resilience.bench.broker_throughput import format_brokers, measure_brokers
from tests.broker_docs import python_blocks, run_block
from tests.nats.nats_support import Names

pytestmark = pytest.mark.broker


def test_docs_example_runs(nats_url: str, names: Names) -> None:
    """The Python example of docs/nats.md publishes and drains 102 messages."""
    (block,) = python_blocks("nats.md")
    result = run_block(
        block,
        {
            '"nats://localhost:4222"': repr(nats_url),
            'stream="ORDERS"': f"stream={names.stream!r}, dead_letter_stream="
            f"{names.dead_letter_stream!r}",
            '"orders"': repr(names.subject()),
        },
    )
    assert result.returncode == 0, result.stderr


def test_bench_brokers_runs_on_nats(nats_url: str) -> None:
    """A tiny `bench brokers` run on NATS drains every message with every contender."""
    report = measure_brokers(brokers=("nats",), urls={"nats": nats_url}, messages=200, rounds=1)
    result = report["brokers"]["nats"]
    assert set(result["messages_per_second"]) == {
        "ResilientConsumer",
        "hand-written",
        "hand-written, inbox callback",
        "hand-written, AckAll",
    }
    leftovers = result["unacknowledged_after_drain"]
    assert set(leftovers.values()) == {0}, leftovers
    assert "nats" in format_brokers(report)
