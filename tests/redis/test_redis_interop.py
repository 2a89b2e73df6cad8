"""Interop with the published abe-redis provider's wire format, both ways.

The reader and writer below do exactly what abe-redis 0.1 does on the wire (its code is not a
dependency): it XADDs ``{"data": json.dumps(payload)}`` and, in a consumer group created at
id ``0``, reads ``fields.get(b"data", b"{}")`` and ``json.loads(data.decode("utf-8"))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.consume_stream import closable
from tests.redis.redis_support import MakeBackend, read_reply

pytestmark = pytest.mark.broker


async def abe_redis_publish(client: aioredis.Redis, key: str, payload: dict[str, Any]) -> None:
    """Publish the way abe-redis does."""
    await client.xadd(key, {"data": json.dumps(payload)}, maxlen=10000, approximate=True)


async def abe_redis_read(
    client: aioredis.Redis, key: str, group: str, count: int
) -> list[dict[str, Any]]:
    """Read and ack in a group the way abe-redis does."""
    with contextlib.suppress(aioredis.ResponseError):  # BUSYGROUP: it exists already
        await client.xgroup_create(key, group, id="0", mkstream=True)
    out: list[dict[str, Any]] = []
    while len(out) < count:
        reply = await client.xreadgroup(group, "abe-redis", {key: ">"}, count=10, block=1000)
        for stream, messages in read_reply(reply):
            for message_id, fields in messages:
                out.append(json.loads(fields.get(b"data", b"{}").decode("utf-8")))
                await client.xack(stream, group, message_id)
    return out


async def test_entries_written_by_abe_redis_are_consumed(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """Payloads abe-redis published are delivered by this backend unchanged."""
    payloads = [{"type": "message", "text": f"hello {n}", "n": n} for n in range(5)]
    for payload in payloads:
        await abe_redis_publish(client, f"{prefix}s", payload)
    backend = make_backend()
    stream = backend.deliveries()
    async with asyncio.timeout(5):
        got = [await anext(stream) for _ in payloads]
    for message in got:
        await backend.ack(message)
    await closable(stream).aclose()
    assert [m.payload for m in got] == payloads
    assert all(m.decode_error is None and not m.headers for m in got)


async def test_entries_written_by_this_backend_are_read_by_abe_redis(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """abe-redis's reader gets the payloads this backend published, headers and all ignored."""
    backend = make_backend()
    payloads = [{"n": n, "nested": {"ok": True, "list": [1, 2.5, None]}} for n in range(4)]
    await backend.publish_message(f"{prefix}s", payloads[0], headers={"traceparent": "00-a-b-01"})
    await backend.publish_many(f"{prefix}s", payloads[1:3])
    await backend.publish(f"{prefix}s", payloads[3])
    assert await abe_redis_read(client, f"{prefix}s", "abe-redis-group", 4) == payloads


async def test_both_share_one_stream_in_separate_groups(
    make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """A stream fed by both writers is read completely by a group of each kind."""
    backend = make_backend()
    await abe_redis_publish(client, f"{prefix}s", {"from": "abe-redis"})
    await backend.publish(f"{prefix}s", {"from": "abe-resilience"})
    expected = [{"from": "abe-redis"}, {"from": "abe-resilience"}]
    assert await abe_redis_read(client, f"{prefix}s", "theirs", 2) == expected
    stream = backend.consume(group="ours")
    async with asyncio.timeout(5):
        assert [await anext(stream), await anext(stream)] == expected
    await closable(stream).aclose()
