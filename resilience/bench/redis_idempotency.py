"""What the idempotency layer costs on Redis: rows of ``resilience bench redis``.

The same pre-filled stream is drained by the full default pipeline over
:class:`~abe.backends.message_queue.service.redis.RedisBackend` (``batch_size=500``) without and
with ``[idempotency] store = "redis"`` (the backend's own client: each message's claim is one
``SET NX PX GET``, its completion record is written by the Lua script that acknowledges the
entry, sent in the same pipeline as the next claim), at concurrency 1 and 64.

Round trips are counted on the client while a drain runs: every write of a command or of a
pipeline to a Redis connection is one (redis-py's ``send_packed_command``), so the count does
not depend on the machine's load. Two counts: over the whole drain (start-up included: the
consumer group, script loads, each new connection's handshake), and in the steady state, from
the first tenth of the messages handled to the end, divided by the messages handled meanwhile
(what each further message costs). The steady count leaves out the backend's periodic work
(the delay scheduler's tick, keep-alives), which costs round trips per second, not per message
(a slower drain has more of it): after the drain the consumer idles for :data:`IDLE` seconds,
and its round trips per second then are subtracted over the steady part's duration. Messages
per second depend on the load; they are the best of the rounds, and the ratios compare rows of
the same run. Target: in the steady state the layer adds at most one round trip per message on
the success path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from resilience.consumer import ResilientConsumer
from resilience.policy import Policy

from ._contenders import full_pipeline_policy
from ._drain import until_handled
from .report import format_table

__all__ = [
    "EXTRA_ROUND_TRIPS_TARGET",
    "IDLE",
    "MAX_MESSAGES",
    "counting_round_trips",
    "format_idempotency",
    "measure_idempotency",
]

GROUP = "bench"
BATCH = 500
MAX_MESSAGES = 20_000
"""Entries per drain at most (the claims make the layer's rows slower than the others)."""
IDLE = 1.0
"""Seconds the consumer idles after a drain to measure its periodic round trips."""
EXTRA_ROUND_TRIPS_TARGET = 1.0
"""Round trips per message the layer may add on the success path."""
TOLERANCE = 0.005
"""Allowance on that target for the estimate of the periodic work subtracted (its rate is
measured over :data:`IDLE` seconds)."""

CONTENDERS: tuple[tuple[str, bool, int], ...] = (
    ("full pipeline", False, 1),
    ("full pipeline + idempotency (Redis)", True, 1),
    ("full pipeline, concurrency 64", False, 64),
    ("full pipeline + idempotency (Redis), concurrency 64", True, 64),
)
"""Name, with the layer, concurrency."""


@contextlib.contextmanager
def counting_round_trips() -> Iterator[Callable[[], int]]:
    """Count writes to Redis connections (one per command or pipeline) while inside.

    Yields:
        A function returning the count so far.
    """
    from redis.asyncio.connection import AbstractConnection

    count = 0
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        nonlocal count
        count += 1
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield lambda: count
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def _policy(namespace: str | None) -> Policy:
    data = full_pipeline_policy().to_dict()
    if namespace is not None:
        data["idempotency"] = {"store": "redis", "namespace": namespace}
    return Policy.from_dict(data)


async def _prefill(client: Any, key: str, messages: int) -> None:
    await client.delete(key)
    await client.xgroup_create(key, GROUP, id="0", mkstream=True)
    body = "x" * 64
    for start in range(0, messages, 1000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(messages, start + 1000)):
            pipe.xadd(key, {"data": json.dumps({"n": n, "body": body})})
        await pipe.execute()


async def _drain(
    url: str, key: str, messages: int, namespace: str | None, concurrency: int
) -> tuple[float, int, float]:
    """Drain ``messages`` entries of ``key``; returns (seconds, round trips, steady-state
    round trips per message)."""
    from abe.backends.message_queue.service.redis import RedisBackend

    backend = RedisBackend(url, streams=[key], group=GROUP, consumer="c", batch_size=BATCH)
    consumer = ResilientConsumer(
        backend, GROUP, policy=_policy(namespace), concurrency=concurrency, drain_timeout=5.0
    )
    done = asyncio.get_running_loop().create_future()
    handled = 0
    tenth = max(1, messages // 10)
    at_tenth = 0
    tenth_at = 0.0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal handled, at_tenth, tenth_at
        handled += 1
        if handled == tenth:
            at_tenth = round_trips()
            tenth_at = time.perf_counter()
        if handled == messages:
            done.set_result(None)

    with counting_round_trips() as round_trips:
        started = time.perf_counter()
        task = asyncio.create_task(consumer.run(handler))
        try:
            await until_handled(task, done, backend.flush)
            ended = time.perf_counter()
            elapsed = ended - started
            trips = round_trips()
            await asyncio.sleep(IDLE)  # the consumer's periodic work, with nothing to handle
            idle_at, idle_trips = time.perf_counter(), round_trips()
        finally:
            await consumer.shutdown()
            await asyncio.gather(task, return_exceptions=True)
            await backend.aclose()
    if messages <= tenth:
        return elapsed, trips, float(trips)
    periodic = (idle_trips - trips) / (idle_at - ended) * (ended - tenth_at)
    return elapsed, trips, (trips - at_tenth - periodic) / (messages - tenth)


async def _forget(client: Any, pattern: str) -> None:
    keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])


async def measure_idempotency(
    client: Any, url: str, messages: int, rounds: int, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Round trips per message and messages per second with and without the layer.

    Args:
        client: A connected ``redis.asyncio.Redis`` (prefills, checks, clean-up).
        url: The Redis URL the consumers connect to.
        messages: Entries per drain (at most :data:`MAX_MESSAGES`).
        rounds: Drains per contender, interleaved, the order rotated every round.
        progress: Called with a label before each drain.

    Returns:
        ``round_trips_per_message`` over whole drains and ``steady_round_trips_per_message``
        (medians of the rounds), ``messages_per_second`` (best),
        the entries left pending after any drain (must be 0), and the ratios.

    Raises:
        RuntimeError: a consumer stopped early.
    """
    messages = min(messages, MAX_MESSAGES)
    prefix = f"resilience-bench-idem:{uuid.uuid4().hex[:12]}"
    trips: dict[str, list[float]] = {name: [] for name, _, _ in CONTENDERS}
    steady: dict[str, list[float]] = {name: [] for name, _, _ in CONTENDERS}
    best: dict[str, float] = {}
    leftovers: dict[str, int] = {name: 0 for name, _, _ in CONTENDERS}
    try:
        for r in range(-1, rounds):  # round -1: an untimed warm-up of every contender
            shift = max(r, 0) % len(CONTENDERS)
            size = min(messages, 1000) if r < 0 else messages
            for name, idempotent, concurrency in CONTENDERS[shift:] + CONTENDERS[:shift]:
                if progress is not None and r >= 0:
                    progress(f"round {r + 1}: {name}")
                key = f"{prefix}:{r + 1}:{concurrency}:{int(idempotent)}"
                await _prefill(client, key, size)
                namespace = f"{key}:" if idempotent else None
                elapsed, count, marginal = await _drain(url, key, size, namespace, concurrency)
                summary = await client.xpending(key, GROUP)
                leftovers[name] = max(leftovers[name], int(summary["pending"]))
                await client.delete(key)
                if r >= 0:
                    trips[name].append(count / size)
                    steady[name].append(marginal)
                    best[name] = max(best.get(name, 0.0), size / elapsed)
    finally:
        await _forget(client, f"{prefix}:*")
        await _forget(client, f"idempotency:{prefix}:*")
    per_message = {name: statistics.median(values) for name, values in trips.items()}
    steady_state = {name: statistics.median(values) for name, values in steady.items()}
    ratios = []
    pairs = zip(CONTENDERS[::2], CONTENDERS[1::2], strict=True)
    for (base, _, _), (layer, _, concurrency) in pairs:
        extra = steady_state[layer] - steady_state[base]
        ratios.append(
            {
                "name": f"extra round trips per message (steady), concurrency {concurrency}",
                "value": extra,
                "target": f"<= {EXTRA_ROUND_TRIPS_TARGET:g} (+{TOLERANCE:g})",
                "met": extra <= EXTRA_ROUND_TRIPS_TARGET + TOLERANCE,
            }
        )
        ratios.append(
            {
                "name": f"msgs/s with / without the layer, concurrency {concurrency}",
                "value": best[layer] / best[base],
                "target": "(info)",
                "met": None,
            }
        )
    return {
        "messages": messages,
        "rounds": rounds,
        "round_trips_per_message": per_message,
        "steady_round_trips_per_message": steady_state,
        "messages_per_second": best,
        "unacknowledged_after_drain": leftovers,
        "ratios": ratios,
    }


def format_idempotency(report: dict[str, Any]) -> str:
    """The idempotency table and its ratios."""
    trips = report["round_trips_per_message"]
    steady = report["steady_round_trips_per_message"]
    rates = report["messages_per_second"]
    left = report["unacknowledged_after_drain"]
    rows = [
        [name, f"{trips[name]:.3f}", f"{steady[name]:.3f}", f"{rates[name]:,.0f}", str(left[name])]
        for name in trips
    ]
    ratio_rows = [
        [
            r["name"],
            f"{r['value']:.3f}",
            r["target"],
            "" if r["met"] is None else "yes" if r["met"] else "NO",
        ]
        for r in report["ratios"]
    ]
    return "\n".join(
        [
            f"idempotency: {report['messages']:,} entries per drain, round trips counted on the "
            f"client (median of {report['rounds']}), msg/s best of {report['rounds']}",
            format_table(
                ("contender", "round trips/msg", "steady", "msg/s", "unacked after"), rows
            ),
            "",
            format_table(("ratio", "value", "target", "met"), ratio_rows),
        ]
    )
