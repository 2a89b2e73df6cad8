"""Message-queue contracts: the backend protocol, the consumer protocol, and extensions."""

from __future__ import annotations

from .consumer import EventConsumer
from .extensions import (
    DeadLetteringBackend,
    DelayingBackend,
    HeaderPublishingBackend,
    InboundMessage,
    SettlingBackend,
)
from .protocol import MessageQueueBackend, MessageQueueBackendProtocol, QueueBackend

__all__ = [
    "DeadLetteringBackend",
    "DelayingBackend",
    "EventConsumer",
    "HeaderPublishingBackend",
    "InboundMessage",
    "MessageQueueBackend",
    "MessageQueueBackendProtocol",
    "QueueBackend",
    "SettlingBackend",
]
