"""Message-queue contracts: the backend protocol, the consumer protocol, and extensions."""

from __future__ import annotations

from .consumer import EventConsumer
from .extensions import (
    DeadLetteringBackend,
    HeaderPublishingBackend,
    InboundMessage,
    SettlingBackend,
)
from .protocol import MessageQueueBackend, MessageQueueBackendProtocol, QueueBackend

__all__ = [
    "DeadLetteringBackend",
    "EventConsumer",
    "HeaderPublishingBackend",
    "InboundMessage",
    "MessageQueueBackend",
    "MessageQueueBackendProtocol",
    "QueueBackend",
    "SettlingBackend",
]
