"""``resilience dlq`` on dead letters kept in a RabbitMQ queue."""

from __future__ import annotations

import pytest

from abe.backends.message_queue.service.rabbitmq import RabbitMQBackend
from resilience.cli import main
from tests.broker_dlq_cli import round_trip
from tests.rabbitmq.rabbitmq_support import Queues

pytestmark = pytest.mark.broker


def test_dlq_lists_shows_replays_and_purges_rabbitmq_dead_letters(
    rabbitmq_url: str,
    queues: Queues,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dead letters in <queue>.dlq are listed, shown, replayed to the queue (with replay
    headers, marked as replayed) and purged by the dlq commands."""
    queue = queues("orders")

    def make() -> RabbitMQBackend:
        return RabbitMQBackend(rabbitmq_url, queues=[queue], dead_letter_exchange=queues.exchange)

    env = {
        "QUEUE_BACKEND": "rabbitmq",
        "RABBITMQ_URL": rabbitmq_url,
        "RABBITMQ_QUEUES": queue,
        "RABBITMQ_DEAD_LETTER_EXCHANGE": queues.exchange,
    }
    round_trip(capsys, monkeypatch, make, queue, f"rabbitmq:{queue}.dlq", env)


def test_dlq_store_spec_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --store form fails with one line naming the allowed forms."""
    code = main(["dlq", "list", "--store", "kafka:x"])
    _, err = capsys.readouterr()
    assert code != 0
    assert "expected sqlite:PATH, rabbitmq:QUEUE" in err
    assert len(err.strip().splitlines()) == 1
