"""Type aliases and protocols shared by every Abstract Backend provider.

The names and shapes follow the published Abstract Backend API so that existing providers and
users' code keep type-checking and running unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeAlias, runtime_checkable

__all__ = [
    # JSON types
    "JSONPrimitive",
    "JSONValue",
    "JSONDict",
    "JSONList",
    # Event types
    "WebhookEventPayload",
    # Handler types
    "SyncEventHandlerFunc",
    "AsyncEventHandlerFunc",
    "EventHandlerFunc",
    # Message-queue types
    "MessageQueueKey",
    "MessageQueuePayload",
    "MessageQueueMessage",
    "MessageQueueBackendConfig",
    "ConsumerGroup",
    # Legacy message-queue names
    "QueueKey",
    "QueuePayload",
    "QueueMessage",
    "QueueBackendConfig",
    # Protocols
    "EventHandlerProtocol",
    "MessageQueueBackendProtocol",
    "QueueBackendProtocol",
]

JSONPrimitive: TypeAlias = str | int | float | bool | None
"""Scalar JSON values."""

JSONValue: TypeAlias = "JSONPrimitive | JSONDict | JSONList"
"""Any JSON-compatible value."""

JSONDict: TypeAlias = "dict[str, JSONValue]"
"""A JSON object."""

JSONList: TypeAlias = "list[JSONValue]"
"""A JSON array."""

WebhookEventPayload: TypeAlias = dict[str, Any]
"""An event payload as received from an upstream system."""

SyncEventHandlerFunc: TypeAlias = Callable[[WebhookEventPayload], None]
"""A synchronous event handler."""

AsyncEventHandlerFunc: TypeAlias = Callable[[WebhookEventPayload], Awaitable[None]]
"""An asynchronous event handler (the signature consumers call)."""

EventHandlerFunc: TypeAlias = SyncEventHandlerFunc | AsyncEventHandlerFunc
"""A synchronous or asynchronous event handler."""

MessageQueueKey: TypeAlias = str
"""Routing key, topic, stream or queue name a message is published to."""

MessageQueuePayload: TypeAlias = dict[str, Any]
"""JSON-serialisable message body."""

MessageQueueMessage: TypeAlias = dict[str, Any]
"""What ``consume()`` yields: the payload, possibly with provider-defined metadata."""

MessageQueueBackendConfig: TypeAlias = dict[str, str | int | bool]
"""Provider configuration, usually read from the environment."""

ConsumerGroup: TypeAlias = str | None
"""Consumer-group name; ``None`` consumes independently."""

# Legacy names kept for providers written against earlier releases.
QueueKey: TypeAlias = MessageQueueKey
QueuePayload: TypeAlias = MessageQueuePayload
QueueMessage: TypeAlias = MessageQueueMessage
QueueBackendConfig: TypeAlias = MessageQueueBackendConfig


@runtime_checkable
class EventHandlerProtocol(Protocol):
    """An object with an async ``handle_event`` method."""

    async def handle_event(self, event: WebhookEventPayload) -> None:
        """Handle one event payload."""
        ...


@runtime_checkable
class MessageQueueBackendProtocol(Protocol):
    """The contract every message-queue provider implements.

    Providers register the class under the ``abe.backends.message_queue`` entry-point group (or
    ``abe.backends.message_queue.service``) and are created with :meth:`from_env`.
    """

    async def publish(self, key: MessageQueueKey, payload: MessageQueuePayload) -> None:
        """Publish ``payload`` under the routing ``key``.

        Raises:
            Exception: provider-specific errors for connection or serialisation failures.
        """
        ...

    async def consume(self, *, group: ConsumerGroup = None) -> AsyncIterator[MessageQueueMessage]:
        """Yield messages until cancelled; ``group`` selects a consumer group when supported.

        Implementations are async generators (or return an async iterator). The protocol's own
        body is the published placeholder: it yields one empty message.
        """
        yield {}

    @classmethod
    def from_env(cls) -> MessageQueueBackendProtocol:
        """Create a configured instance from environment variables.

        Raises:
            ValueError: a required variable is missing or invalid.
        """
        ...


QueueBackendProtocol = MessageQueueBackendProtocol
"""Legacy name of :class:`MessageQueueBackendProtocol`."""
