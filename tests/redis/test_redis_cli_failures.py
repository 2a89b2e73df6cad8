"""`resilience run` on a Redis it cannot use: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis.redis_support import RedisServer, free_port

pytestmark = pytest.mark.slow


def run_cli(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`resilience run h:handle` against ``url`` with JSON logs; returns the finished process."""
    (tmp_path / "h.py").write_text("async def handle(payload):\n    pass\n")
    env = {
        **os.environ,
        "QUEUE_BACKEND": "redis",
        "REDIS_URL": url,
        "REDIS_STREAMS": "cli-failure-test",
    }
    return subprocess.run(
        [sys.executable, "-m", "resilience", "run", "h:handle", "--log-format", "json", *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The process failed with exactly one stderr line containing every needle."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_wrong_password_is_one_line(tmp_path: Path) -> None:
    """A wrong Redis password ends `run` at once with one line naming the refusal, exit 2."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path, password="right-secret")
    server.start()
    try:
        proc = run_cli(tmp_path, f"redis://:wrong-secret@127.0.0.1:{server.port}/0")
    finally:
        server.kill()
    line = assert_one_line(proc, "AuthenticationError", "check the password")
    assert "wrong-secret" not in line


def test_refused_port_is_one_line_after_the_connect_timeout(tmp_path: Path) -> None:
    """A port nothing listens on ends `run` after --connect-timeout with one line, exit 2."""
    port = free_port()
    proc = run_cli(tmp_path, f"redis://127.0.0.1:{port}/0", "--connect-timeout", "0.5")
    assert_one_line(proc, "cannot reach the broker", f"127.0.0.1:{port}", "within 0.5s")


def test_unknown_host_is_one_line_after_the_connect_timeout(tmp_path: Path) -> None:
    """A host name that does not resolve ends `run` after --connect-timeout with one line."""
    proc = run_cli(tmp_path, "redis://no-such-host.invalid:6379/0", "--connect-timeout", "0.5")
    assert_one_line(proc, "cannot reach the broker", "no-such-host.invalid")


def test_debug_logs_keep_the_traceback(tmp_path: Path) -> None:
    """With debug logging asked for, the refusal's traceback is still there to read."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path, password="right-secret")
    server.start()
    try:
        proc = run_cli(
            tmp_path, f"redis://:wrong@127.0.0.1:{server.port}/0", "--log-level", "debug"
        )
    finally:
        server.kill()
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("resilience: error: the consumer stopped")
