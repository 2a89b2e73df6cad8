"""Idempotent consumption: a message's effects happen once although deliveries are at least once.

See :class:`Idempotency` for the layer and the stores :class:`SQLiteStore` (embedded default),
:class:`RedisStore`, :class:`PostgresStore` (with the handler's statements in the same
transaction as the completion record) and :class:`MemoryStore`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._store import (
    ClaimLost,
    ClaimState,
    IdempotencyStore,
    InProgressElsewhere,
    StoreUnavailable,
)
from .config import IdempotencyConfig, policy_section
from .layer import DEFAULT_HEADER, Idempotency, KeyFunction, current_transaction
from .memory import MemoryStore
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .postgres import PostgresStore
    from .redis import RedisEffects, RedisStore

__all__ = [
    "DEFAULT_HEADER",
    "ClaimLost",
    "ClaimState",
    "Idempotency",
    "IdempotencyConfig",
    "IdempotencyStore",
    "InProgressElsewhere",
    "KeyFunction",
    "MemoryStore",
    "PostgresStore",
    "RedisEffects",
    "RedisStore",
    "SQLiteStore",
    "StoreUnavailable",
    "current_transaction",
    "policy_section",
]


def __getattr__(name: str) -> Any:
    # The Redis and PostgreSQL stores import their client libraries: only when asked for.
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    if name in ("RedisStore", "RedisEffects"):
        from . import redis

        return getattr(redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
