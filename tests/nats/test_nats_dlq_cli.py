"""``resilience dlq`` on dead letters kept in a NATS JetStream stream."""

from __future__ import annotations

import pytest

from abe.backends.message_queue.service.nats import NATSBackend
from tests.broker_dlq_cli import round_trip
from tests.nats.nats_support import Names

pytestmark = pytest.mark.broker


def test_dlq_lists_shows_replays_and_purges_nats_dead_letters(
    nats_url: str,
    names: Names,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dead letters in the dead-letter stream are listed, shown, replayed to their subject
    (with replay headers, marked as replayed) and purged by the dlq commands."""
    subject = names.subject()

    def make() -> NATSBackend:
        return NATSBackend(
            nats_url,
            stream=names.stream,
            subjects=[subject],
            dead_letter_stream=names.dead_letter_stream,
            block=0.5,
        )

    env = {
        "QUEUE_BACKEND": "nats",
        "NATS_URL": nats_url,
        "NATS_STREAM": names.stream,
        "NATS_SUBJECTS": subject,
        "NATS_DEAD_LETTER_STREAM": names.dead_letter_stream,
    }
    round_trip(capsys, monkeypatch, make, subject, f"nats:{names.dead_letter_stream}", env)
