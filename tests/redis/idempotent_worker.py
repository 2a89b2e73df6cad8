"""A consumer process for the idempotency chaos tests (run by them; not collected by pytest).

Usage::

    python idempotent_worker.py URL STREAM CONSUMER PREFIX [--store redis|postgres]
                                [--dsn DSN --table TABLE] [--work S]

It runs a :class:`~resilience.consumer.ResilientConsumer` over a
:class:`~abe.backends.message_queue.service.redis.RedisBackend` (group ``workers``) with the
:class:`~resilience.idempotency.Idempotency` layer. For every payload ``{"n": n}`` the handler
counts the run in the Redis hash ``<PREFIX>runs`` (at once, outside any transaction), works for
``--work`` seconds, then records its completion through ``current_transaction()``: with the
Redis store ``HINCRBY <PREFIX>done n 1`` in the completion script, with the PostgreSQL store an
``INSERT`` of ``n`` into TABLE in the completion transaction. It prints ``ready`` once
consuming; the tests SIGKILL it at random moments.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import redis.asyncio as aioredis

from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.idempotency import IdempotencyStore, PostgresStore, RedisStore, current_transaction
from resilience.pipeline import Pipeline


async def main() -> None:
    """Consume until SIGTERM or SIGKILL."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("stream")
    parser.add_argument("consumer")
    parser.add_argument("prefix")
    parser.add_argument("--store", default="redis")
    parser.add_argument("--dsn", default="")
    parser.add_argument("--table", default="")
    parser.add_argument("--work", type=float, default=0.002)
    args = parser.parse_args()

    counter = aioredis.Redis.from_url(args.url)
    backend = RedisBackend(
        args.url,
        streams=[args.stream],
        group="workers",
        consumer=args.consumer,
        batch_size=10,
        claim_idle=0.5,
    )
    store: IdempotencyStore
    if args.store == "redis":
        store = RedisStore(backend=backend, prefix=f"{args.prefix}idem:")
    else:
        store = PostgresStore(args.dsn, table=f"{args.table}_idem", max_connections=2)
    pipeline = Pipeline().idempotent(store, lease=1.0, wait=3.0, poll=0.05)

    async def handler(payload: dict[str, Any]) -> None:
        n = payload["n"]
        await counter.hincrby(f"{args.prefix}runs", str(n), 1)
        await asyncio.sleep(args.work)
        transaction = current_transaction()
        if args.store == "redis":
            transaction.call("HINCRBY", f"{args.prefix}done", str(n), 1)
        else:
            await transaction.execute(f"INSERT INTO {args.table} (n) VALUES (%s)", (n,))

    consumer = ResilientConsumer(backend, policy=pipeline, drain_timeout=5)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    run = asyncio.create_task(consumer.run(handler))
    print("ready", flush=True)
    await stop.wait()
    await consumer.shutdown()
    await run
    await backend.aclose()
    await counter.aclose()
    if isinstance(store, PostgresStore):
        await store.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
