"""Hostile stream entries through the whole stack, real Redis: no entry can stop a consumer.

A batch mixing valid entries with JSON nested 10,000 levels deep, invalid UTF-8, a missing
``data`` field, non-object JSON and malformed headers runs through a full policy (retry,
timeouts, circuit breaker, telemetry with tracing, dead letters in SQLite): the valid entries are
handled and acknowledged, every bad one is dead-lettered once with stage ``decode``, and the
consumer keeps going, also when the batch was left pending by a consumer that crashed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from resilience.consumer import ResilientConsumer
from resilience.dead_letter import SQLiteStore
from resilience.policy import Policy
from tests.redis.redis_support import MakeBackend, eventually

pytestmark = pytest.mark.broker

DEEP = 10_000

BAD_ENTRIES: list[dict[str, bytes | str]] = [
    {"data": "[" * DEEP + "]" * DEEP},
    {"data": '{"a":' * DEEP + "1" + "}" * DEEP},
    {"data": '{"order": {"items": ' + "[" * DEEP + "]" * DEEP + "}}", "h:traceparent": "x"},
    {"data": b"\xff\xfe{not utf-8"},
    {"payload": "{}", "h:x-replay-count": "3"},
    {"data": "[1, 2, 3]"},
    {"data": '"just a string"'},
    {"data": "", "h:\xff": b"\xff"},
]
"""Entries that must be dead-lettered with stage ``decode``."""

ODD_VALID: list[dict[str, bytes | str]] = [
    {"data": json.dumps({"n": 100}), "h:x-replay-count": "²"},  # isdigit() but not int()
    {"data": json.dumps({"n": 101}), "h:x-replay-count": "9" * 5000},
    {"data": json.dumps({"n": 102}), "h:traceparent": "00-" + "z" * 32 + "-" + "y" * 16 + "-01"},
    {"data": json.dumps({"n": 103}), "h:tracestate": "k=" + "v" * 100_000, "h:": "empty name"},
    {"data": json.dumps({"n": 104, "deep": json.loads("[" * 300 + "]" * 300)})},
    {"data": json.dumps({"n": 105, "blob": "x" * (2 * 1024 * 1024)})},
]
"""Entries that decode (odd headers, deep-ish or huge bodies) and must be handled."""


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider (restored afterwards) exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER", None)
    otel_trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


async def _fill(client: aioredis.Redis, stream: str) -> tuple[set[int], set[str]]:
    """Valid, bad and odd entries interleaved; returns the valid ``n`` and the bad entry ids."""
    valid: set[int] = set()
    bad: set[str] = set()
    n = 0
    for bad_fields in BAD_ENTRIES:
        for _ in range(2):
            await client.xadd(stream, {"data": json.dumps({"n": n})})
            valid.add(n)
            n += 1
        entry_id: Any = await client.xadd(stream, bad_fields)  # type: ignore[arg-type]
        bad.add(entry_id.decode())
    for fields in ODD_VALID:
        await client.xadd(stream, fields)  # type: ignore[arg-type]
        valid.add(json.loads(fields["data"])["n"])
    return valid, bad


@pytest.mark.parametrize("reclaimed", [False, True], ids=["read", "reclaimed"])
async def test_a_batch_with_hostile_entries_is_handled_and_the_consumer_keeps_running(
    spans: InMemorySpanExporter,
    make_backend: MakeBackend,
    client: aioredis.Redis,
    prefix: str,
    tmp_path: Path,
    reclaimed: bool,
) -> None:
    """Valid entries of the batch are handled and acked, each bad one is dead-lettered once with
    stage decode, and the consumer goes on consuming; also when a crashed consumer left the
    whole batch pending and it is reclaimed."""
    stream = f"{prefix}s"
    valid, bad = await _fill(client, stream)
    if reclaimed:
        await client.xgroup_create(stream, "g", id="0")
        read: Any = await client.xreadgroup("g", "crashed", {stream: ">"}, count=1000)
        ids: list[Any] = [entry_id for entry_id, _ in read[0][1]]
        assert len(ids) == len(valid) + len(bad)
        # Idle for an hour on Redis's clock: reclaimable at once, with no real wait.
        await client.xclaim(stream, "g", "crashed", 0, ids, idle=3_600_000, justid=True)
    backend = make_backend(batch_size=100)
    path = tmp_path / "dlq.sqlite3"
    policy = Policy.from_dict(
        {
            "retry": {"attempts": 3, "initial": 0, "maximum": 0},
            "timeout": {"attempt": 30, "total": 60},
            "circuit_breaker": {"name": "hostile", "failure_threshold": 2},
            "dead_letter": {"destination": "sqlite", "path": str(path)},
            "telemetry": {},  # on: the tracer provider above is an SDK one
        }
    )
    handled: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        handled.append(payload["n"])

    consumer = ResilientConsumer(backend, policy=policy)
    task = asyncio.create_task(consumer.run(handler))
    store = SQLiteStore(path)
    try:
        await eventually(
            lambda: _settled(handled, valid, store, bad), timeout=30, what="the first batch"
        )
        assert not task.done(), "the consumer stopped"
        await client.xadd(stream, {"data": json.dumps({"n": 1000})})
        await eventually(lambda: _true(1000 in handled), timeout=10, what="a later entry")
        assert not task.done(), "the consumer stopped"
    finally:
        await consumer.shutdown()
        await task
    assert sorted(handled) == sorted(valid | {1000}), "each valid entry handled once"
    records = await store.find()
    assert sorted(r.envelope["source"]["message_id"] for r in records) == sorted(bad)
    for record in records:
        assert record.stage == "decode"
        assert record.reason == "decode_error"
        assert record.envelope["raw"] is not None or "raw" in record.envelope["truncated"]
    deep = [r for r in records if "RecursionError" in r.envelope["error"]["message"]]
    assert len(deep) == 3
    assert await backend.pending() == 0, "every entry, valid or bad, was acknowledged"
    assert backend.stats.poison == len(bad)
    assert backend.stats.reclaimed == (len(valid) + len(bad) if reclaimed else 0)
    consumed = [s for s in spans.get_finished_spans() if s.kind is otel_trace.SpanKind.CONSUMER]
    assert len(consumed) == len(valid) + len(bad) + 1, "a span per delivery, odd headers too"


async def _settled(handled: list[int], valid: set[int], store: SQLiteStore, bad: set[str]) -> bool:
    if set(handled) != valid or not store.exists():
        return False
    return len(await store.find()) == len(bad)


async def _true(value: bool) -> bool:
    return value


@pytest.mark.slow
async def test_resilience_run_dead_letters_a_deeply_nested_entry_and_goes_on(
    client: aioredis.Redis, prefix: str, redis_url: str, tmp_path: Path
) -> None:
    """`resilience run` on Redis handles the valid entries around a 10,000-level nested one,
    dead-letters that one with stage decode and exits 0 after --max-messages."""
    stream = f"{prefix}s"
    await client.xadd(stream, {"data": json.dumps({"n": 1})})
    await client.xadd(stream, {"data": "[" * DEEP + "]" * DEEP})
    await client.xadd(stream, {"data": json.dumps({"n": 2})})
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "hostile_handler.py").write_text(
        textwrap.dedent(
            f"""
            import json

            async def handle(payload):
                with open({str(seen)!r}, "a") as fh:
                    fh.write(json.dumps(payload) + "\\n")
            """
        )
    )
    dlq = tmp_path / "dlq.sqlite3"
    (tmp_path / "policy.toml").write_text(
        f'[dead_letter]\ndestination = "sqlite"\npath = {json.dumps(str(dlq))}\n'
    )
    env = {
        **os.environ,
        "QUEUE_BACKEND": "redis",
        "REDIS_URL": redis_url,
        "REDIS_STREAMS": stream,
        "REDIS_GROUP": "g",
        "PYTHONPATH": str(tmp_path),
    }
    command = [sys.executable, "-m", "resilience", "run", "hostile_handler:handle"]
    command += ["--policy", "policy.toml", "--max-messages", "3", "--log-format", "json"]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = err.decode(errors="replace")
    assert process.returncode == 0, text
    assert "settled 3 message(s)" in text
    assert sorted(json.loads(line)["n"] for line in seen.read_text().splitlines()) == [1, 2]
    (record,) = await SQLiteStore(dlq).find()
    assert record.stage == "decode"
    assert "RecursionError" in record.envelope["error"]["message"]
    pending = await client.xpending(stream, "g")
    assert pending["pending"] == 0
