"""`resilience run` exit codes after a graceful stop: 0 after a clean drain, 3 when it timed out."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.cli_process import CliProcess, poll

pytestmark = [pytest.mark.slow, pytest.mark.broker]

HANDLER = """
import asyncio
from pathlib import Path

async def handle(payload):
    Path(f"started-{payload['n']}").touch()
    if payload.get("hang"):
        await asyncio.Event().wait()  # never finishes on its own
    Path(f"done-{payload['n']}").touch()
"""


@pytest.fixture
def stream(redis_url: str) -> Iterator[str]:
    """A stream name no other test uses; its keys are deleted afterwards."""
    name = f"abe-test:{uuid.uuid4().hex[:12]}:drain"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(name, f"{name}.dlq")
    finally:
        client.close()


def _run(workdir: Path, url: str, stream: str, payload: dict[str, object]) -> tuple[int, int]:
    """Publish ``payload``, run the CLI until the handler started, SIGTERM it.

    Returns:
        The exit code and the group's pending count afterwards.
    """
    (workdir / "handler.py").write_text(HANDLER)
    client = redis.Redis.from_url(url)
    try:
        client.xadd(stream, {"data": json.dumps(payload)})
        cli = CliProcess(
            workdir,
            [
                "run",
                "handler:handle",
                "--group",
                "g",
                "--drain-timeout",
                "0.3",
                "--log-format",
                "json",
            ],
            {"QUEUE_BACKEND": "redis", "REDIS_URL": url, "REDIS_STREAMS": stream},
        )
        try:
            cli.started()
            poll(
                lambda: (workdir / f"started-{payload['n']}").exists(), what="the handler to start"
            )
            code = cli.stop()
        finally:
            cli.kill()
        pending = client.xpending(stream, "g")["pending"]
        return code, int(pending)
    finally:
        client.close()


def test_drain_that_times_out_exits_3_and_releases_the_message(
    tmp_path: Path, redis_url: str, stream: str
) -> None:
    """A handler still running when the drain timeout ends: exit code 3, the message not acked."""
    code, pending = _run(tmp_path, redis_url, stream, {"n": 1, "hang": True})
    assert code == 3
    assert pending == 1  # released, not acknowledged: the group delivers it again
    assert not (tmp_path / "done-1").exists()


def test_clean_drain_exits_0_and_acks(tmp_path: Path, redis_url: str, stream: str) -> None:
    """A handler that finishes within the drain timeout: exit code 0, the message acked."""
    code, pending = _run(tmp_path, redis_url, stream, {"n": 2})
    assert code == 0
    assert pending == 0
    assert (tmp_path / "done-2").exists()
