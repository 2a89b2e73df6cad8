"""The PostgreSQL idempotency store on a real PostgreSQL: claims, and the handler's statements
committed in the same transaction as the completion record."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resilience.delivery import Delivery
from resilience.events import Outcome
from resilience.idempotency import ClaimLost, ClaimState, PostgresStore, current_transaction
from resilience.pipeline import Pipeline

pytestmark = [pytest.mark.broker]


async def rows(store: PostgresStore, table: str) -> list[int]:
    pool = await store._ready()
    async with pool.connection() as conn:
        cursor = await conn.execute(f"SELECT n FROM {table} ORDER BY n")
        return [row[0] for row in await cursor.fetchall()]


async def make(dsn: str, table: str) -> PostgresStore:
    store = PostgresStore(dsn, table=f"{table}_idem", max_connections=2)
    pool = await store._ready()
    async with pool.connection() as conn:
        await conn.execute(f"CREATE TABLE {table} (n integer NOT NULL)")
    return store


async def test_postgres_store_claims_completes_and_releases(
    postgres_table: tuple[str, str],
) -> None:
    """One claim wins, completion makes it completed, release is owner-only, a lost claim
    raises ClaimLost and rolls back."""
    dsn, table = postgres_table
    store = await make(dsn, table)
    try:
        delivery = Delivery({})
        assert await store.claim("k", "a", 30) is ClaimState.CLAIMED
        assert await store.claim("k", "b", 30) is ClaimState.BUSY
        await store.release("k", "b")
        assert await store.claim("k", "b", 30) is ClaimState.BUSY
        async with store.complete("k", "a", 60, delivery):
            pass
        assert await store.claim("k", "b", 30) is ClaimState.COMPLETED
        assert await store.claim("j", "a", 30) is ClaimState.CLAIMED
        await store.release("j", "a")
        assert await store.claim("j", "c", 30) is ClaimState.CLAIMED
        with pytest.raises(ClaimLost):
            async with store.complete("j", "a", 60, delivery) as conn:
                await conn.execute(f"INSERT INTO {table} (n) VALUES (1)")
        assert await rows(store, table) == []
        assert await store.claim("j", "d", 30) is ClaimState.BUSY
    finally:
        await store.close()


async def test_handler_statements_commit_with_the_completion_record(
    postgres_table: tuple[str, str],
) -> None:
    """A handler writing through current_transaction(): a failed run leaves no row, the
    successful retry leaves one, and a duplicate adds none."""
    dsn, table = postgres_table
    store = await make(dsn, table)
    attempts = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal attempts
        attempts += 1
        await current_transaction().execute(f"INSERT INTO {table} (n) VALUES (%s)", (payload["n"],))
        if attempts == 1:
            raise ConnectionError("the downstream call after the insert failed")

    try:
        call = Pipeline().idempotent(store).build(handler)
        with pytest.raises(ConnectionError):
            await call(Delivery({"n": 7}, key="orders", message_id="1-0"))
        assert await rows(store, table) == []
        await call(Delivery({"n": 7}, key="orders", message_id="1-0"))
        duplicate = Delivery({"n": 7}, key="orders", message_id="1-0")
        await call(duplicate)
        assert duplicate.outcome is Outcome.DUPLICATE
        assert attempts == 2
        assert await rows(store, table) == [7]
    finally:
        await store.close()


async def test_consumers_starting_at_once_create_the_table_without_error(
    postgres_table: tuple[str, str],
) -> None:
    """Several stores whose first claims arrive at the same moment all create-or-find the
    missing table and claim their keys (no catalog unique violation from a concurrent
    CREATE TABLE IF NOT EXISTS)."""
    import psycopg

    dsn, table = postgres_table
    for _ in range(5):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {table}_idem")
        stores = [PostgresStore(dsn, table=f"{table}_idem", max_connections=1) for _ in range(4)]
        try:
            states = await asyncio.gather(
                *(store.claim(f"k{i}", "a", 30) for i, store in enumerate(stores))
            )
        finally:
            await asyncio.gather(*(store.close() for store in stores))
        assert states == [ClaimState.CLAIMED] * 4
