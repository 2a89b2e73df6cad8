"""docs/rabbitmq.md's example runs, and ``bench brokers`` runs on RabbitMQ."""

from __future__ import annotations

import pytest

from resilience.bench.broker_throughput import format_brokers, measure_brokers
from tests.broker_docs import python_blocks, run_block
from tests.rabbitmq.rabbitmq_support import Queues

pytestmark = pytest.mark.broker


def test_docs_example_runs(rabbitmq_url: str, queues: Queues) -> None:
    """The Python example of docs/rabbitmq.md publishes and drains 102 messages."""
    (block,) = python_blocks("rabbitmq.md")
    queue = queues("orders")
    result = run_block(
        block,
        {
            '"amqp://guest:guest@localhost:5672/"': repr(rabbitmq_url),
            '"orders"': repr(queue),
            'queues=["orders"]': f"queues=[{queue!r}], dead_letter_exchange={queues.exchange!r}",
        },
    )
    assert result.returncode == 0, result.stderr


def test_bench_brokers_runs_on_rabbitmq(rabbitmq_url: str) -> None:
    """A tiny `bench brokers` run on RabbitMQ drains every message with both contenders."""
    report = measure_brokers(
        brokers=("rabbitmq",), urls={"rabbitmq": rabbitmq_url}, messages=200, rounds=1
    )
    result = report["brokers"]["rabbitmq"]
    assert set(result["messages_per_second"]) == {"ResilientConsumer", "hand-written"}
    assert result["unacknowledged_after_drain"] == {"ResilientConsumer": 0, "hand-written": 0}
    assert [r["name"] for r in result["ratios"]] == ["ResilientConsumer / hand-written"]
    assert "rabbitmq" in format_brokers(report)
