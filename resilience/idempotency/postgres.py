"""Claims and completion records in one PostgreSQL table, written in the handler's transaction.

Uses psycopg 3 (async, with its connection pool). While the handler runs, the layer holds a
transaction open on a pooled connection and hands the connection to the handler through
:func:`~resilience.idempotency.current_transaction`; the completion record is written in that
transaction, so the handler's own statements and the record commit together or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._store import ClaimLost, ClaimState

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from ..delivery import Delivery

__all__ = ["PostgresStore"]

_DONE = ""
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresStore:
    """Idempotency records in a PostgreSQL table (created when missing).

    Args:
        conninfo: A libpq connection string, e.g. ``"postgresql://postgres@127.0.0.1/test"``.
        table: The table's name (letters, digits and underscores).
        max_connections: Size of the connection pool: at most that many messages hold a
            transaction at once (set it to the consumer's concurrency or more).

    Raises:
        ConfigError: ``table`` is not a plain identifier, or ``max_connections`` < 1.
        ImportError: ``psycopg`` or ``psycopg_pool`` is not installed (the ``postgres`` extra).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        table: str = "resilience_idempotency",
        max_connections: int = 10,
    ) -> None:
        if not isinstance(table, str) or not _NAME.match(table):
            raise ConfigError(
                f"idempotency table must be a plain identifier (letters, digits, _), got {table!r}"
            )
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise ConfigError(f"max_connections must be an integer, got {max_connections!r}")
        if max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {max_connections}")
        from psycopg_pool import AsyncConnectionPool

        self.table = table
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            conninfo, min_size=1, max_size=max_connections, open=False
        )
        self._opened = False
        self._lock = asyncio.Lock()
        t = table
        self._create = (
            f"CREATE TABLE IF NOT EXISTS {t} (key text PRIMARY KEY, owner text NOT NULL, "
            "expires_at timestamptz NOT NULL)"
        )
        self._claim_sql = (
            f"INSERT INTO {t} (key, owner, expires_at) "
            "VALUES (%s, %s, clock_timestamp() + make_interval(secs => %s)) "
            "ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, "
            f"expires_at = EXCLUDED.expires_at WHERE {t}.expires_at <= clock_timestamp() "
            "RETURNING owner"
        )
        self._create_lock = "SELECT pg_advisory_xact_lock(hashtext(%s))"
        self._holder_sql = f"SELECT owner FROM {t} WHERE key = %s"
        self._complete_sql = (
            f"INSERT INTO {t} (key, owner, expires_at) "
            "VALUES (%s, '', clock_timestamp() + make_interval(secs => %s)) "
            "ON CONFLICT (key) DO UPDATE SET owner = '', expires_at = EXCLUDED.expires_at "
            f"WHERE {t}.owner = %s OR {t}.expires_at <= clock_timestamp()"
        )
        self._release_sql = f"DELETE FROM {t} WHERE key = %s AND owner = %s"
        self._purge_sql = f"DELETE FROM {t} WHERE expires_at <= clock_timestamp()"

    def __repr__(self) -> str:
        return f"PostgresStore(table={self.table!r})"

    async def _ready(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        if not self._opened:
            async with self._lock:
                if not self._opened:
                    await self._pool.open(wait=True)
                    # CREATE TABLE IF NOT EXISTS is not safe against itself: two consumers
                    # creating the table at once can fail with a unique violation in the
                    # catalog. A transaction-scoped advisory lock on the table's name makes
                    # them take turns; the second then finds the table there.
                    async with self._pool.connection() as conn, conn.transaction():
                        await conn.execute(self._create_lock, (f"resilience:{self.table}",))
                        await conn.execute(self._create)
                    self._opened = True
        return self._pool

    async def claim(self, key: str, owner: str, lease: float) -> ClaimState:
        """Claim ``key`` with one ``INSERT ... ON CONFLICT`` (and a look at the holder if taken)."""
        pool = await self._ready()
        async with pool.connection() as conn:
            cursor = await conn.execute(self._claim_sql, (key, owner, lease))
            if await cursor.fetchone() is not None:
                return ClaimState.CLAIMED
            cursor = await conn.execute(self._holder_sql, (key,))
            row = await cursor.fetchone()
        if row is not None and row[0] == _DONE:
            return ClaimState.COMPLETED
        return ClaimState.BUSY  # held, or deleted since: look again after a wait

    @contextlib.asynccontextmanager
    async def complete(
        self, key: str, owner: str, ttl: float, delivery: Delivery
    ) -> AsyncIterator[AsyncConnection[Any]]:
        """Open a transaction, yield its connection to the handler, then write the completion
        record in it and commit; an exception rolls everything back.

        Raises:
            ClaimLost: another consumer took the claim over; the handler's statements were
                rolled back with the record.
        """
        pool = await self._ready()
        async with pool.connection() as conn, conn.transaction():
            yield conn
            cursor = await conn.execute(self._complete_sql, (key, ttl, owner))
            if cursor.rowcount != 1:
                raise ClaimLost(f"the claim on {key!r} was taken over while the handler ran")

    async def release(self, key: str, owner: str) -> None:
        """Drop ``owner``'s claim on ``key``."""
        pool = await self._ready()
        async with pool.connection() as conn:
            await conn.execute(self._release_sql, (key, owner))

    async def purge(self) -> int:
        """Delete expired claims and records.

        Returns:
            How many rows were deleted.
        """
        pool = await self._ready()
        async with pool.connection() as conn:
            cursor = await conn.execute(self._purge_sql)
            return cursor.rowcount

    async def close(self) -> None:
        """Close the connection pool."""
        await self._pool.close()
        self._opened = False
