"""A consumer process for the delayed-redelivery Redis tests (run by them; not collected).

Usage::

    python redis_delay_worker.py URL STREAM CONSUMER RECORD_KEY --fail N --wait S

It runs a :class:`~resilience.consumer.ResilientConsumer` (concurrency 4) over a
:class:`~abe.backends.message_queue.service.redis.RedisBackend` in group ``workers`` with tiered
retry: one attempt in process, then every retry waits ``S`` seconds in the stream's delay set.
For a payload ``{"n": n}`` the handler counts the attempt in the hash ``RECORD_KEY:attempts``
(field ``n``); the first ``N`` attempts of each message fail with ``ConnectionError``, the next
appends ``n`` to the list ``RECORD_KEY``. It prints ``ready`` once consuming and exits cleanly on
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import redis.asyncio as aioredis

from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.policy import Policy


async def main() -> None:
    """Consume until SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("stream")
    parser.add_argument("consumer")
    parser.add_argument("record_key")
    parser.add_argument("--fail", type=int, default=0)
    parser.add_argument("--wait", type=float, default=0.05)
    args = parser.parse_args()

    recorder = aioredis.Redis.from_url(args.url)
    backend = RedisBackend(
        args.url, streams=[args.stream], group="workers", consumer=args.consumer, block=0.2
    )
    policy = Policy.from_dict(
        {
            "retry": {
                "attempts": 20,
                "in_process": 1,
                "backoff": "fixed",
                "initial": args.wait,
                "maximum": args.wait,
            },
            "timeout": {"attempt": 30},
        }
    )

    async def handler(payload: dict[str, Any]) -> None:
        n = payload["n"]
        attempt = await recorder.hincrby(f"{args.record_key}:attempts", str(n), 1)
        if attempt <= args.fail:
            raise ConnectionError(f"attempt {attempt} of {n} fails")
        await recorder.rpush(args.record_key, n)

    consumer = ResilientConsumer(backend, policy=policy, concurrency=4)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(consumer.run(handler))
    print("ready", flush=True)
    await stop.wait()
    await consumer.shutdown()
    await task
    await backend.aclose()
    await recorder.aclose()


if __name__ == "__main__":
    asyncio.run(main())
