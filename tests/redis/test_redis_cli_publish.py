"""``resilience publish`` against a real Redis (QUEUE_BACKEND=redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from tests.redis.redis_support import stream_entries

pytestmark = pytest.mark.broker


async def test_publish_appends_to_the_stream_with_headers(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """The command XADDs one entry per JSON object in the abe-redis format, headers as h:NAME."""
    stream = f"{prefix}orders"
    env = {**os.environ, "QUEUE_BACKEND": "redis", "REDIS_URL": redis_url}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resilience",
            "publish",
            stream,
            '{"order": 1}',
            '{"order": 2}',
            "--header",
            "traceparent=00-abc-def-01",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    entries = stream_entries(await client.xrange(stream))
    assert [json.loads(fields[b"data"]) for _, fields in entries] == [{"order": 1}, {"order": 2}]
    assert all(fields[b"h:traceparent"] == b"00-abc-def-01" for _, fields in entries)
    ids = ", ".join(entry_id.decode() for entry_id, _ in entries)
    assert f"published 2 message(s) to '{stream}' via RedisBackend: {ids}" in proc.stdout


def test_publish_reports_an_unreachable_redis_in_one_line() -> None:
    """A Redis that does not answer is one error line and exit code 2, no traceback."""
    env = {**os.environ, "QUEUE_BACKEND": "redis", "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run(
        [sys.executable, "-m", "resilience", "publish", "orders", "{}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "publishing to 'orders' failed" in proc.stderr
    assert "Traceback" not in proc.stderr
