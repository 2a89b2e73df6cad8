"""``resilience demo``: the plain consumer over the in-memory backend."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from abe.backends.message_queue.consumer import AsyncLoopConsumer
from abe.backends.message_queue.service.memory import MemoryBackend


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser("demo", help="run the demo on the in-memory backend")
    parser.add_argument("--messages", type=int, default=20, help="how many messages to publish")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=_run)


async def _demo(count: int) -> dict[str, Any]:
    backend = MemoryBackend.isolated()
    for i in range(count):
        await backend.publish("demo", {"id": i})
    seen: list[int] = []
    done = asyncio.Event()
    consumer = AsyncLoopConsumer(backend)

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["id"])
        if len(seen) == count:
            done.set()

    task = asyncio.create_task(consumer.run(handler))
    if count:
        await done.wait()
    await consumer.shutdown()
    await asyncio.gather(task, return_exceptions=True)
    return {"published": count, "processed": len(seen)}


def _run(args: argparse.Namespace) -> int:
    summary = asyncio.run(_demo(args.messages))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"published {summary['published']}, processed {summary['processed']}")
    return 0
