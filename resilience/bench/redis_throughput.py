"""Broker throughput: messages per second draining a pre-filled Redis stream.

The contenders drain the same number of entries (the ``abe-redis`` wire format: JSON in field
``data``) from a fresh stream and consumer group, decoding every payload and awaiting a handler
that does nothing, then acknowledging it:

* ``ResilientConsumer``: :class:`~resilience.consumer.ResilientConsumer` with the full default
  pipeline over :class:`~abe.backends.message_queue.service.redis.RedisBackend` (at-least-once:
  acknowledged after the handler, batched multi-id XACK); the clock stops once every ack is
  flushed. Variants with ``Policy()`` as is, with no middleware, and with the backend's default
  batch size show where the time goes.
* ``hand-written``: a redis-py loop, XREADGROUP COUNT 500 and one multi-id XACK per batch.
* ``abe-redis pattern``: XREADGROUP COUNT 10 and one XACK round trip per message.

All use redis-py's asyncio client (with hiredis when installed) against the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from resilience.consumer import ResilientConsumer
from resilience.pipeline import Pipeline
from resilience.policy import Policy

from ._contenders import full_pipeline_policy
from ._drain import counting_handler, until_handled
from .redis_idempotency import MAX_MESSAGES, format_idempotency, measure_idempotency
from .redis_streams import format_streams, measure_streams
from .report import format_table, machine_info, quiet_policy_advice

__all__ = [
    "RedisUnavailable",
    "format_throughput",
    "measure_idempotency_alone",
    "measure_throughput",
    "redis_server",
]

GROUP = "bench"
WARMUP = 1000
"""Entries each contender drains, untimed, before the measured rounds."""
SHUTDOWN_LIMIT = 5.0
"""Drain timeout given to the ResilientConsumer; its shutdown time is reported, not timed."""

Runner = Callable[[Any, str, str, int], Awaitable[float]]
shutdowns: list[float] = []
Progress = Callable[[int, int, str, float], None]


class RedisUnavailable(RuntimeError):
    """No Redis answered (or redis-py is not installed)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Start a throw-away ``redis-server`` on a free loopback port; yields its URL.

    Raises:
        RedisUnavailable: ``redis-server`` is not installed or did not start.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable("redis-server is not installed")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="resilience-bench-redis-") as workdir:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RedisUnavailable("redis-server did not start") from None
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _client(url: str) -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:
        raise RedisUnavailable(
            f"redis-py is not installed (pip install 'abe-resilience[redis]'): {exc}"
        ) from None
    client = aioredis.from_url(url)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise RedisUnavailable(f"Redis at {url} does not answer: {exc}") from None
    return client


async def _prefill(client: Any, key: str, messages: int) -> None:
    await client.delete(key)
    await client.xgroup_create(key, GROUP, id="0", mkstream=True)
    for start in range(0, messages, 1000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(messages, start + 1000)):
            pipe.xadd(key, {"data": json.dumps({"n": n, "body": "x" * 64})})
        await pipe.execute()


async def _noop(payload: dict[str, Any]) -> None:
    return None


async def _hand_written(client: Any, url: str, key: str, messages: int) -> float:
    started = time.perf_counter()
    handled = 0
    while handled < messages:
        reply = await client.xreadgroup(GROUP, "hand", {key: ">"}, count=500, block=1000)
        if not reply:
            continue
        ids = []
        for entry_id, fields in reply[0][1]:
            await _noop(json.loads(fields[b"data"]))
            ids.append(entry_id)
        await client.xack(key, GROUP, *ids)
        handled += len(ids)
    return time.perf_counter() - started


async def _abe_redis(client: Any, url: str, key: str, messages: int) -> float:
    started = time.perf_counter()
    handled = 0
    while handled < messages:
        reply = await client.xreadgroup(GROUP, "abe", {key: ">"}, count=10, block=1000)
        if not reply:
            continue
        for entry_id, fields in reply[0][1]:
            await _noop(json.loads(fields[b"data"]))
            await client.xack(key, GROUP, entry_id)
            handled += 1
    return time.perf_counter() - started


def _resilient(batch_size: int | None, policy: Callable[[], Policy | Pipeline]) -> Runner:
    async def run(client: Any, url: str, key: str, messages: int) -> float:
        from abe.backends.message_queue.service.redis import RedisBackend

        # The backend opens its own connection pool, as in production.
        backend = RedisBackend(
            url, streams=[key], group=GROUP, consumer="resilient", batch_size=batch_size
        )
        consumer = ResilientConsumer(backend, GROUP, policy=policy(), drain_timeout=SHUTDOWN_LIMIT)
        handler, done = counting_handler(messages)

        started = time.perf_counter()
        task = asyncio.create_task(consumer.run(handler))
        try:
            await until_handled(task, done, backend.flush)
            elapsed = time.perf_counter() - started
        finally:
            stopping = time.perf_counter()
            await consumer.shutdown()
            await asyncio.gather(task, return_exceptions=True)
            await backend.aclose()
            shutdowns.append(time.perf_counter() - stopping)
        return elapsed

    return run


def _contenders() -> list[tuple[str, str, Runner | None]]:
    try:
        import abe.backends.message_queue.service.redis  # noqa: F401
    except ImportError as exc:
        missing = f"not available: {exc}"
        resilient: list[tuple[str, str, Runner | None]] = [("ResilientConsumer", missing, None)]
    else:
        resilient = [
            (
                "ResilientConsumer",
                "full default pipeline, RedisBackend batch_size=500, at-least-once acks",
                _resilient(500, full_pipeline_policy),
            ),
            (
                "ResilientConsumer, Policy()",
                "Policy() as is (retry and attempt timeout), batch_size=500",
                _resilient(500, Policy),
            ),
            (
                "ResilientConsumer, no middleware",
                "an empty pipeline: deliveries and at-least-once acks only, batch_size=500",
                _resilient(500, Pipeline),
            ),
            (
                "ResilientConsumer (backend defaults)",
                "full default pipeline with RedisBackend's default batch_size (100)",
                _resilient(None, full_pipeline_policy),
            ),
        ]
    return [
        *resilient,
        (
            "hand-written",
            "redis-py: XREADGROUP COUNT 500, one multi-id XACK per batch",
            _hand_written,
        ),
        ("abe-redis pattern", "XREADGROUP COUNT 10, one XACK per message", _abe_redis),
    ]


async def _measure(
    url: str, messages: int, rounds: int, progress: Progress | None
) -> dict[str, Any]:
    client = await _client(url)
    key = f"resilience-bench:{uuid.uuid4().hex}"
    contenders = _contenders()
    shutdowns.clear()
    runnable = [(name, run) for name, _, run in contenders if run is not None]
    best: dict[str, float] = {}
    leftovers: dict[str, int] = {}
    total = rounds * len(runnable)
    step = 0
    try:
        # One small untimed drain each, so first-use costs (imports, connection pools, caches)
        # do not land on whichever contender happens to run first.
        warmup = min(messages, WARMUP)
        for _, run in runnable:
            await _prefill(client, key, warmup)
            await run(client, url, key, warmup)
        for r in range(rounds):
            # Rotate the order each round, so slow drift of the machine hits every contender.
            order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)]
            for name, run in order:
                if progress is not None:
                    progress(step, total, f"round {r + 1}: {name}", 0.0)
                await _prefill(client, key, messages)
                elapsed = await run(client, url, key, messages)
                pending = await client.xpending(key, GROUP)
                leftovers[name] = max(leftovers.get(name, 0), int(pending["pending"]))
                rate = messages / elapsed
                best[name] = max(best.get(name, 0.0), rate)
                step += 1
        info = await client.info("server")
    finally:
        with contextlib.suppress(Exception):
            await client.delete(key)
        await client.aclose()
    if progress is not None:
        progress(total, total, "done", 1.0)
    try:
        from redis.utils import HIREDIS_AVAILABLE as hiredis
    except ImportError:
        hiredis = False
    hand = best.get("hand-written")
    abe = best.get("abe-redis pattern")
    ours = best.get("ResilientConsumer")
    ratios = []
    for name in ("ResilientConsumer", "ResilientConsumer, Policy()"):
        drained = best.get(name)
        if drained and hand:
            value = drained / hand
            ratios.append(
                {
                    "name": f"{name} / hand-written",
                    "value": value,
                    "target": ">= 0.80",
                    "met": value >= 0.8,
                }
            )
    if ours and abe:
        value = ours / abe
        ratios.append(
            {
                "name": "ResilientConsumer / abe-redis pattern",
                "value": value,
                "target": ">= 10",
                "met": value >= 10,
            }
        )
    return {
        "benchmark": "redis",
        "messages": messages,
        "rounds": rounds,
        "redis_version": info.get("redis_version"),
        "hiredis": bool(hiredis),
        "machine": machine_info(),
        "messages_per_second": best,
        "descriptions": {name: why for name, why, _ in contenders},
        "not_available": {name: why for name, why, run in contenders if run is None},
        "unacknowledged_after_drain": leftovers,
        "resilient_shutdown_seconds": max(shutdowns, default=None),
        "ratios": ratios,
    }


@contextlib.contextmanager
def _server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    env = os.environ.get("REDIS_URL")
    if env:
        yield env
        return
    if shutil.which("redis-server"):
        with redis_server() as started:
            yield started
        return
    yield "redis://127.0.0.1:6379/0"


def measure_throughput(
    *,
    url: str | None = None,
    messages: int = 100_000,
    rounds: int = 3,
    progress: Progress | None = None,
    streams: bool = True,
    idempotency: bool = True,
) -> dict[str, Any]:
    """Drain ``messages`` entries with every contender, ``rounds`` times; keep the best rate.

    Args:
        url: The Redis to use; default ``REDIS_URL``, else a temporary ``redis-server`` when
            one is installed, else ``redis://127.0.0.1:6379/0``. Keys are namespaced and
            deleted afterwards.
        messages: Entries per drain.
        rounds: Drains per contender.
        progress: Called with (steps done, steps in all, label, fraction).
        streams: Also drain the same number of entries spread over 1, 100 and 1,000 streams
            (:mod:`resilience.bench.redis_streams`; under ``streams``).
        idempotency: Also drain with and without the idempotency layer on Redis, counting
            round trips (:mod:`resilience.bench.redis_idempotency`; under ``idempotency``).

    Returns:
        A JSON-ready document with messages per second per contender and the two ratios.

    Raises:
        RedisUnavailable: no Redis answered, or redis-py is missing.
        RuntimeError: called from a running event loop (use a thread).
    """
    if messages < 1 or rounds < 1:
        raise ValueError("messages and rounds must be >= 1")
    with _server(url) as resolved, quiet_policy_advice():
        report = asyncio.run(_measure(resolved, messages, rounds, progress))
        if streams:
            report["streams"] = asyncio.run(_stream_counts(resolved, messages, rounds))
        if idempotency:
            report["idempotency"] = asyncio.run(_idempotency_rows(resolved, messages, rounds))
        return report


async def _stream_counts(url: str, messages: int, rounds: int) -> dict[str, Any]:
    client = await _client(url)
    try:
        return await measure_streams(client, url, messages, rounds)
    finally:
        await client.aclose()


async def _idempotency_rows(url: str, messages: int, rounds: int) -> dict[str, Any]:
    client = await _client(url)
    try:
        return await measure_idempotency(client, url, messages, rounds)
    finally:
        await client.aclose()


def format_throughput(report: dict[str, Any]) -> str:
    """The throughput report for the terminal."""
    rates: dict[str, float] = report["messages_per_second"]
    hand = rates.get("hand-written")
    rows = []
    for name, rate in rates.items():
        rows.append(
            [
                name,
                f"{rate:,.0f}",
                f"{rate / hand:.2f}x" if hand else "-",
                str(report["unacknowledged_after_drain"].get(name, "-")),
            ]
        )
    for name, why in report["not_available"].items():
        rows.append([name, why, "", ""])
    ratio_rows = [
        [r["name"], f"{r['value']:.2f}", r["target"], "yes" if r["met"] else "NO"]
        for r in report["ratios"]
    ]
    parts = [
        f"{report['messages']:,} entries per drain, best of {report['rounds']}; Redis "
        f"{report['redis_version']}, hiredis {'on' if report['hiredis'] else 'off'}",
        "",
        format_table(("contender", "msg/s", "vs hand-written", "unacked after"), rows),
    ]
    if ratio_rows:
        parts += ["", format_table(("ratio", "value", "target", "met"), ratio_rows)]
    if report.get("streams"):
        parts += ["", format_streams(report["streams"])]
    if report.get("idempotency"):
        parts += ["", format_idempotency(report["idempotency"])]
    shutdown = report.get("resilient_shutdown_seconds")
    if shutdown is not None:
        parts += [
            "",
            f"ResilientConsumer shutdown after the drain took up to {shutdown:.2f}s "
            f"(drain timeout {SHUTDOWN_LIMIT:g}s; not part of the rates)",
        ]
    return "\n".join(parts)


def measure_idempotency_alone(
    *, url: str | None = None, messages: int = MAX_MESSAGES, rounds: int = 3
) -> dict[str, Any]:
    """These rows alone (``resilience bench redis`` runs them after its other tables).

    Args:
        url: The Redis to use, found as ``resilience bench redis`` finds it (``REDIS_URL``,
            else a throw-away ``redis-server``, else the local one).
        messages: Entries per drain (at most
            :data:`~resilience.bench.redis_idempotency.MAX_MESSAGES`).
        rounds: Drains per contender.

    Returns:
        The document :func:`~resilience.bench.redis_idempotency.measure_idempotency` returns.

    Raises:
        RedisUnavailable: no Redis answered, or redis-py is missing.
    """
    with _server(url) as resolved, quiet_policy_advice():
        return asyncio.run(_idempotency_rows(resolved, messages, rounds))
