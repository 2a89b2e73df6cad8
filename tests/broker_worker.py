"""A consumer process for the multi-process RabbitMQ and NATS tests (run by them; not collected).

Usage::

    QUEUE_BACKEND=rabbitmq RABBITMQ_...=... python broker_worker.py NAME RECORD_FILE
        [--stall-after N] [--work S]

It creates the backend with ``load_backend()`` (so from the environment, as ``resilience run``
does) and runs a :class:`~resilience.consumer.ResilientConsumer` over it. For every payload
``{"n": n}`` it handles it appends ``<NAME>:<n>`` as a line to RECORD_FILE (one unbuffered
write, so a SIGKILL leaves whole lines). Payloads ``{"poison": true}`` are dead-lettered to
``<key>.dlq``. After ``--stall-after`` messages it hangs (the test then kills it). It prints
``ready`` once consuming and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from abe.backends.message_queue.loader import load_backend
from resilience.consumer import ResilientConsumer
from resilience.errors import DeadLetter
from resilience.policy import Policy


async def main() -> None:
    """Consume until SIGTERM (or forever, when stalled)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("record_file")
    parser.add_argument("--stall-after", type=int, default=0)
    parser.add_argument("--work", type=float, default=0.0)
    args = parser.parse_args()

    backend: Any = load_backend()
    policy = Policy.from_dict(
        {
            "retry": {"attempts": 2, "initial": 0.001, "maximum": 0.001},
            "timeout": {"attempt": 30},
            "dead_letter": {"destination": "backend"},
        }
    )
    fd = os.open(args.record_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    handled = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal handled
        if args.stall_after and handled >= args.stall_after:
            await asyncio.Event().wait()  # hang here, holding the prefetched messages
        if payload.get("poison"):
            raise DeadLetter("poison payload")
        if args.work:
            await asyncio.sleep(args.work)
        os.write(fd, f"{args.name}:{payload['n']}\n".encode())
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
    os.close(fd)
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
