"""Message-queue backends: contracts, the default consumer, the loader and providers."""

from __future__ import annotations

from .base import EventConsumer, MessageQueueBackend

__all__ = ["EventConsumer", "MessageQueueBackend"]
