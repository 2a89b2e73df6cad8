"""Tests for the published names of abe.types and the message_queue re-exports."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator
from typing import Any

import pytest

import abe
import abe.backends.message_queue as message_queue
import abe.backends.message_queue.base as base
from abe import types
from abe.backends.message_queue.base.consumer import EventConsumer
from abe.backends.message_queue.base.protocol import MessageQueueBackend

PUBLISHED_NAMES = [
    "JSONPrimitive",
    "JSONValue",
    "JSONDict",
    "JSONList",
    "WebhookEventPayload",
    "SyncEventHandlerFunc",
    "AsyncEventHandlerFunc",
    "EventHandlerFunc",
    "MessageQueueKey",
    "MessageQueuePayload",
    "MessageQueueMessage",
    "MessageQueueBackendConfig",
    "ConsumerGroup",
    "QueueKey",
    "QueuePayload",
    "QueueMessage",
    "QueueBackendConfig",
    "EventHandlerProtocol",
    "MessageQueueBackendProtocol",
    "QueueBackendProtocol",
]


class CompleteBackend:
    """Has every member of the backend protocol."""

    async def publish(self, key: str, payload: dict[str, Any]) -> None:
        pass

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        yield {}

    @classmethod
    def from_env(cls) -> CompleteBackend:
        return cls()


class NoFromEnv:
    """Lacks from_env()."""

    async def publish(self, key: str, payload: dict[str, Any]) -> None:
        pass

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        yield {}


@pytest.mark.parametrize("name", PUBLISHED_NAMES)
async def test_published_name_exists_and_is_exported(name: str) -> None:
    """Every published abe.types name is defined and listed in __all__."""
    assert hasattr(types, name)
    assert name in types.__all__


async def test_all_lists_only_published_names() -> None:
    """abe.types.__all__ holds exactly the published names, each once."""
    assert sorted(types.__all__) == sorted(PUBLISHED_NAMES)


@pytest.mark.parametrize(
    ("legacy", "current"),
    [
        ("QueueKey", "MessageQueueKey"),
        ("QueuePayload", "MessageQueuePayload"),
        ("QueueMessage", "MessageQueueMessage"),
        ("QueueBackendConfig", "MessageQueueBackendConfig"),
        ("QueueBackendProtocol", "MessageQueueBackendProtocol"),
    ],
)
async def test_legacy_names_are_the_current_objects(legacy: str, current: str) -> None:
    """Each legacy name is the very object of its current name, not a look-alike."""
    assert getattr(types, legacy) is getattr(types, current)


async def test_alias_shapes_match_the_published_api() -> None:
    """The concrete aliases have the published shapes."""
    assert types.MessageQueueKey is str
    assert types.MessageQueuePayload == dict[str, Any]
    assert types.MessageQueueMessage == dict[str, Any]
    assert types.WebhookEventPayload == dict[str, Any]
    assert types.MessageQueueBackendConfig == dict[str, str | int | bool]
    assert types.ConsumerGroup == str | None
    assert types.JSONPrimitive == str | int | float | bool | None


async def test_handler_aliases_describe_sync_and_async_callables() -> None:
    """EventHandlerFunc is the union of the sync and the async handler signatures."""
    assert set(typing.get_args(types.EventHandlerFunc)) == {
        types.SyncEventHandlerFunc,
        types.AsyncEventHandlerFunc,
    }


async def test_backend_protocol_is_runtime_checkable() -> None:
    """isinstance() against MessageQueueBackendProtocol accepts complete backends only."""
    assert isinstance(CompleteBackend(), types.MessageQueueBackendProtocol)
    assert not isinstance(NoFromEnv(), types.MessageQueueBackendProtocol)
    assert not isinstance(object(), types.MessageQueueBackendProtocol)


async def test_event_handler_protocol_is_runtime_checkable() -> None:
    """isinstance() against EventHandlerProtocol checks for handle_event."""

    class Handler:
        async def handle_event(self, event: dict[str, Any]) -> None:
            pass

    assert isinstance(Handler(), types.EventHandlerProtocol)
    assert not isinstance(object(), types.EventHandlerProtocol)


async def test_event_consumer_is_runtime_checkable() -> None:
    """isinstance() against EventConsumer checks for run and shutdown."""

    class OnlyRun:
        async def run(self, handler: Any) -> None:
            pass

    class Full(OnlyRun):
        async def shutdown(self) -> None:
            pass

    assert isinstance(Full(), EventConsumer)
    assert not isinstance(OnlyRun(), EventConsumer)


@pytest.mark.parametrize("module", [message_queue, base], ids=lambda m: m.__name__)
async def test_packages_re_export_the_contracts(module: Any) -> None:
    """message_queue and message_queue.base re-export EventConsumer and MessageQueueBackend."""
    assert module.EventConsumer is EventConsumer
    assert module.MessageQueueBackend is MessageQueueBackend
    assert {"EventConsumer", "MessageQueueBackend"} <= set(module.__all__)


async def test_base_names_the_backend_protocol_under_every_published_name() -> None:
    """MessageQueueBackend, MessageQueueBackendProtocol and QueueBackend are one protocol."""
    assert base.MessageQueueBackend is types.MessageQueueBackendProtocol
    assert base.MessageQueueBackendProtocol is types.MessageQueueBackendProtocol
    assert base.QueueBackend is types.MessageQueueBackendProtocol


async def test_base_all_names_resolve() -> None:
    """Every name in message_queue.base.__all__ is importable from it."""
    for name in base.__all__:
        assert getattr(base, name) is not None


async def test_package_version_is_exposed() -> None:
    """abe.__version__ is a non-empty version string."""
    assert isinstance(abe.__version__, str)
    assert abe.__version__
