"""Redis throughput against the number of streams: rows of ``resilience bench redis``.

The same number of entries is spread round-robin over 1, 100 and 1,000 streams (a fresh set of
streams and consumer groups per drain) and drained by:

* ``ResilientConsumer``: the full default pipeline over one
  :class:`~abe.backends.message_queue.service.redis.RedisBackend` reading every stream
  (``batch_size=500``; at-least-once acks); the clock stops once every ack is flushed.
* ``hand-written``: a redis-py loop that creates its groups in one pipelined round trip (as
  any consumer must at start), then reads every stream in one XREADGROUP (``COUNT 500``) and
  acknowledges each stream's entries with one multi-id XACK per read, all XACKs of a read
  pipelined in one round trip.

Both clocks run from the start of the consumer to the last acknowledgement; the
``ResilientConsumer`` also reclaims idle entries at start (one more pipelined round trip), which
the hand-written loop does not do.

Each stream count's ratio (ResilientConsumer over hand-written, best drains of the same run)
should stay at 0.9 or more: the project's cost must not grow with the number of streams.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ._contenders import full_pipeline_policy
from ._drain import counting_handler, until_handled
from .report import format_table

__all__ = ["STREAM_COUNTS", "STREAM_TARGET", "format_streams", "measure_streams"]

STREAM_COUNTS = (1, 100, 1000)
STREAM_TARGET = 0.9
GROUP = "bench"
BATCH = 500

Runner = Callable[[Any, str, list[str], int], Awaitable[float]]
Progress = Callable[[str], None]


async def _prefill(client: Any, keys: list[str], messages: int) -> None:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.delete(key)
        pipe.xgroup_create(key, GROUP, id="0", mkstream=True)
    await pipe.execute()
    body = "x" * 64
    for start in range(0, messages, 1000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(messages, start + 1000)):
            pipe.xadd(keys[n % len(keys)], {"data": json.dumps({"n": n, "body": body})})
        await pipe.execute()


async def _noop(payload: dict[str, Any]) -> None:
    return None


async def _hand_written(client: Any, url: str, keys: list[str], messages: int) -> float:
    streams = dict.fromkeys(keys, ">")
    started = time.perf_counter()
    # What any consumer of a group does at start (the groups exist: each answers BUSYGROUP).
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xgroup_create(key, GROUP, id="0", mkstream=True)
    await pipe.execute(raise_on_error=False)
    handled = 0
    while handled < messages:
        reply = await client.xreadgroup(GROUP, "hand", streams, count=BATCH, block=1000)
        if not reply:
            continue
        pipe = client.pipeline(transaction=False)
        for stream, entries in reply:
            ids = []
            for entry_id, fields in entries:
                await _noop(json.loads(fields[b"data"]))
                ids.append(entry_id)
            pipe.xack(stream, GROUP, *ids)
            handled += len(ids)
        await pipe.execute()
    return time.perf_counter() - started


async def _resilient(client: Any, url: str, keys: list[str], messages: int) -> float:
    from abe.backends.message_queue.service.redis import RedisBackend
    from resilience.consumer import ResilientConsumer

    backend = RedisBackend(url, streams=keys, group=GROUP, consumer="resilient", batch_size=BATCH)
    consumer = ResilientConsumer(backend, GROUP, policy=full_pipeline_policy(), drain_timeout=5)
    handler, done = counting_handler(messages)

    started = time.perf_counter()
    task = asyncio.create_task(consumer.run(handler))
    try:
        await until_handled(task, done, backend.flush)
        elapsed = time.perf_counter() - started
    finally:
        await consumer.shutdown()
        await asyncio.gather(task, return_exceptions=True)
        await backend.aclose()
    return elapsed


CONTENDERS: dict[str, Runner] = {"ResilientConsumer": _resilient, "hand-written": _hand_written}


async def _pending(client: Any, keys: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xpending(key, GROUP)
    return sum(int(summary["pending"]) for summary in await pipe.execute())


async def measure_streams(
    client: Any, url: str, messages: int, rounds: int, progress: Progress | None = None
) -> dict[str, Any]:
    """Messages per second of each contender at each stream count (best of ``rounds``).

    Returns:
        ``messages_per_second[contender][streams]``, the entries left pending after any drain
        (must be 0), and one ratio per stream count against :data:`STREAM_TARGET`.

    Raises:
        RuntimeError: a contender stopped early or lost entries.
    """
    prefix = f"resilience-bench-streams:{uuid.uuid4().hex}"
    cases = [(name, count) for count in STREAM_COUNTS for name in CONTENDERS]
    best: dict[str, dict[str, float]] = {name: {} for name in CONTENDERS}
    leftovers: dict[str, int] = dict.fromkeys(CONTENDERS, 0)
    used: set[str] = set()
    try:
        for name, count in cases:  # warm-up
            keys = [f"{prefix}:{count}:{i}" for i in range(count)]
            used.update(keys)
            await _prefill(client, keys, min(messages, 2000))
            await CONTENDERS[name](client, url, keys, min(messages, 2000))
        for r in range(rounds):
            for name, count in cases[r % len(cases) :] + cases[: r % len(cases)]:
                if progress is not None:
                    progress(f"round {r + 1}: {name}, {count} streams")
                keys = [f"{prefix}:{count}:{i}" for i in range(count)]
                await _prefill(client, keys, messages)
                elapsed = await CONTENDERS[name](client, url, keys, messages)
                leftovers[name] = max(leftovers[name], await _pending(client, keys))
                rate = messages / elapsed
                best[name][str(count)] = max(best[name].get(str(count), 0.0), rate)
    finally:
        for start in range(0, len(used), 500):
            await client.delete(*sorted(used)[start : start + 500])
    ratios = []
    for count in STREAM_COUNTS:
        ours, hand = best["ResilientConsumer"][str(count)], best["hand-written"][str(count)]
        ratios.append(
            {
                "name": f"ResilientConsumer / hand-written, {count} streams",
                "value": ours / hand,
                "target": f">= {STREAM_TARGET}",
                "met": ours / hand >= STREAM_TARGET,
            }
        )
    return {
        "messages": messages,
        "rounds": rounds,
        "stream_counts": list(STREAM_COUNTS),
        "messages_per_second": best,
        "unacknowledged_after_drain": leftovers,
        "ratios": ratios,
    }


def format_streams(report: dict[str, Any]) -> str:
    """The stream-count table and its ratios."""
    counts = [str(c) for c in report["stream_counts"]]
    left = report["unacknowledged_after_drain"]
    rows = [
        [name, *(f"{rates[c]:,.0f}" for c in counts), str(left[name])]
        for name, rates in report["messages_per_second"].items()
    ]
    return "\n".join(
        [
            f"{report['messages']:,} entries spread over 1 to {counts[-1]} streams, best of "
            f"{report['rounds']}: messages/s",
            format_table(("contender", *(f"{c} streams" for c in counts), "unacked after"), rows),
            "",
            format_table(
                ("ratio", "value", "target", "met"),
                [
                    [r["name"], f"{r['value']:.2f}", r["target"], "yes" if r["met"] else "NO"]
                    for r in report["ratios"]
                ],
            ),
        ]
    )
