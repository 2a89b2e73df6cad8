"""Settings of the RabbitMQ and NATS backends: defaults, environment, one clear error line."""

from __future__ import annotations

import re

import pytest

from abe.backends.message_queue.service._nats_settings import NATSSettings
from abe.backends.message_queue.service._rabbitmq_settings import RabbitMQSettings


def test_rabbitmq_settings_read_the_environment() -> None:
    """RABBITMQ_* variables set the URL, queues, prefetch, queue type and delay tiers."""
    settings = RabbitMQSettings.from_environ(
        {
            "RABBITMQ_URL": "amqp://u:p@broker:5672/vh",
            "RABBITMQ_QUEUES": "orders, payments",
            "RABBITMQ_PREFETCH": "32",
            "RABBITMQ_QUEUE_TYPE": "classic",
            "RABBITMQ_DELAY_TIERS": "30,1,5",
            "RABBITMQ_DEAD_LETTER_EXCHANGE": "dlx",
        }
    )
    assert settings.url == "amqp://u:p@broker:5672/vh"
    assert settings.queues == ("orders", "payments")
    assert (settings.prefetch, settings.queue_type) == (32, "classic")
    assert settings.delay_tiers == (1.0, 5.0, 30.0)
    assert settings.dead_letter_exchange == "dlx"


def test_rabbitmq_defaults_are_quorum_queues() -> None:
    """Without variables the backend reads queue ``events`` as a quorum queue."""
    settings = RabbitMQSettings.from_environ({})
    assert (settings.queues, settings.queue_type, settings.delivery_limit) == (
        ("events",),
        "quorum",
        None,
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RABBITMQ_URL", "redis://x", "RABBITMQ_URL='redis://x' is not valid: expected amqp://"),
        ("RABBITMQ_QUEUES", "a,,b", "RABBITMQ_QUEUES='a,,b' is not valid"),
        ("RABBITMQ_PREFETCH", "0", "RABBITMQ_PREFETCH='0' is not valid: expected an integer >= 1"),
        ("RABBITMQ_QUEUE_TYPE", "stream", "expected one of quorum, classic"),
        ("RABBITMQ_DELIVERY_LIMIT", "x", "RABBITMQ_DELIVERY_LIMIT='x' is not valid"),
        ("RABBITMQ_DELAY_TIERS", "1,-5", "RABBITMQ_DELAY_TIERS='1,-5' is not valid"),
    ],
)
def test_rabbitmq_invalid_variables_fail_with_one_clear_line(
    name: str, value: str, expected: str
) -> None:
    """An invalid variable raises ValueError naming it, its value and what is allowed."""
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        RabbitMQSettings.from_environ({name: value})
    assert "\n" not in str(info.value)


def test_rabbitmq_password_is_redacted_from_errors() -> None:
    """A bad URL's password never appears in the error."""
    with pytest.raises(ValueError, match=r"\*\*\*") as info:
        RabbitMQSettings(url="http://u:secret@host/")
    assert "secret" not in str(info.value)


def test_rabbitmq_tier_rounds_a_delay_up() -> None:
    """A delay goes to the next tier up, or the longest tier when it is longer than all."""
    settings = RabbitMQSettings(delay_tiers=(1, 5, 30))
    assert [settings.tier_for(d) for d in (0, 1, 1.5, 29, 500)] == [1, 1, 5, 30, 30]


def test_nats_settings_read_the_environment() -> None:
    """NATS_* variables set the URL, stream, subjects, durable, batch, ack wait and limit."""
    settings = NATSSettings.from_environ(
        {
            "NATS_URL": "nats://a:4222,nats://b:4222",
            "NATS_STREAM": "ORDERS",
            "NATS_SUBJECTS": "orders.*, refunds",
            "NATS_DURABLE": "billing",
            "NATS_BATCH_SIZE": "64",
            "NATS_ACK_WAIT": "45",
            "NATS_MAX_DELIVER": "10",
        }
    )
    assert settings.stream == "ORDERS"
    assert settings.subjects == ("orders.*", "refunds")
    assert (settings.durable, settings.batch_size) == ("billing", 64)
    assert (settings.ack_wait, settings.max_deliver) == (45, 10)
    assert settings.dead_letter_stream == "ORDERS_DLQ"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("NATS_URL", "amqp://x", "NATS_URL='amqp://x' is not valid: expected nats://"),
        ("NATS_STREAM", "a.b", "NATS_STREAM='a.b' is not valid"),
        ("NATS_DURABLE", "my consumer", "NATS_DURABLE='my consumer' is not valid"),
        ("NATS_SUBJECTS", "a,", "NATS_SUBJECTS='a,' is not valid"),
        ("NATS_BATCH_SIZE", "-1", "NATS_BATCH_SIZE='-1' is not valid: expected an integer >= 1"),
        ("NATS_ACK_WAIT", "soon", "NATS_ACK_WAIT='soon' is not valid"),
    ],
)
def test_nats_invalid_variables_fail_with_one_clear_line(
    name: str, value: str, expected: str
) -> None:
    """An invalid variable raises ValueError naming it, its value and what is allowed."""
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        NATSSettings.from_environ({name: value})
    assert "\n" not in str(info.value)


def test_nats_dead_letter_stream_must_differ_from_the_work_stream() -> None:
    """Dead letters cannot go to the stream the consumer reads."""
    with pytest.raises(ValueError, match="dead_letter_stream must differ from stream"):
        NATSSettings(stream="S", dead_letter_stream="S")
