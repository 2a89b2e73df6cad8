"""Type-checked, never run: the RabbitMQ and NATS backends as users write them."""

from __future__ import annotations

from datetime import timedelta

from abe.backends.message_queue.base import (
    DeadLetteringBackend,
    DelayingBackend,
    HeaderPublishingBackend,
    MessageQueueBackend,
    SettlingBackend,
)
from abe.backends.message_queue.service.nats import NATSBackend, NATSSettings
from abe.backends.message_queue.service.rabbitmq import RabbitMQBackend, RabbitMQSettings
from resilience.dead_letter.broker_stores import NATSStore, RabbitMQStore
from resilience.dead_letter.sinks import DeadLetterStore


async def usage() -> None:
    rabbit = RabbitMQBackend(
        "amqp://guest:guest@localhost:5672/",
        queues=["orders"],
        prefetch=100,
        delay_tiers=[1, 10],
        settings=RabbitMQSettings.from_environ({}),
    )
    nats = NATSBackend(
        "nats://localhost:4222", stream="ORDERS", subjects=["orders"], ack_wait=timedelta(minutes=1)
    )
    for backend in (rabbit, nats):
        plain: MessageQueueBackend = backend
        settling: SettlingBackend = backend
        dead_lettering: DeadLetteringBackend = backend
        headers: HeaderPublishingBackend = backend
        delaying: DelayingBackend = backend
        await plain.publish("orders", {"id": 1})
        await headers.publish_message("orders", {"id": 2}, headers={"traceparent": "00-..."})
        async for message in settling.deliveries():
            await delaying.release_later(message, 5.0)
            await dead_lettering.dead_letter(message, "orders.dlq", {"id": "e"})
            break
    settings: NATSSettings = nats.settings
    assert settings.max_deliver is None or settings.max_deliver > 0
    stores: list[DeadLetterStore] = [
        RabbitMQStore("amqp://localhost/", "orders.dlq"),
        NATSStore("nats://localhost:4222", "ORDERS_DLQ"),
    ]
    assert stores
