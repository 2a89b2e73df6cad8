"""A consumer process for the multi-process Redis tests (run by them; not collected by pytest).

Usage::

    python redis_worker.py URL STREAM CONSUMER RECORD_KEY [--batch-size N] [--claim-idle S]
                           [--stall-after N] [--work S]

It runs a :class:`~resilience.consumer.ResilientConsumer` over a
:class:`~abe.backends.message_queue.service.redis.RedisBackend` in group ``workers``. The handler
appends ``<consumer>:<n>`` to the Redis list RECORD_KEY for every payload ``{"n": n}`` it
processes, dead-letters payloads marked ``{"poison": true}`` (to ``<STREAM>.dlq``, atomically),
and after ``--stall-after`` messages hangs forever (the test then kills the process). It prints
``ready`` once consuming and exits cleanly on SIGTERM (flushing its acknowledgements).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import redis.asyncio as aioredis

from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.errors import DeadLetter
from resilience.policy import Policy


async def main() -> None:
    """Consume until SIGTERM (or forever, when stalled)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("stream")
    parser.add_argument("consumer")
    parser.add_argument("record_key")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--claim-idle", type=float, default=5.0)
    parser.add_argument("--stall-after", type=int, default=0)
    parser.add_argument("--work", type=float, default=0.0)
    args = parser.parse_args()

    recorder = aioredis.Redis.from_url(args.url)
    backend = RedisBackend(
        args.url,
        streams=[args.stream],
        group="workers",
        consumer=args.consumer,
        batch_size=args.batch_size,
        claim_idle=args.claim_idle,
    )
    policy = Policy.from_dict(
        {
            "retry": {"attempts": 2, "initial": 0.001, "maximum": 0.001},
            "timeout": {"attempt": 30},
            "dead_letter": {"destination": "backend"},
        }
    )
    handled = 0
    stalled = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal handled
        if args.stall_after and handled >= args.stall_after:
            stalled.set()
            await asyncio.Event().wait()  # hang here until SIGKILL
        if payload.get("poison"):
            raise DeadLetter("poison payload")
        if args.work:
            await asyncio.sleep(args.work)
        await recorder.rpush(args.record_key, f"{args.consumer}:{payload['n']}")
        handled += 1

    consumer = ResilientConsumer(backend, policy=policy, drain_timeout=5)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    run = asyncio.create_task(consumer.run(handler))
    print("ready", flush=True)
    await stop.wait()
    await consumer.shutdown()
    await run
    await backend.aclose()
    await recorder.aclose()
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
