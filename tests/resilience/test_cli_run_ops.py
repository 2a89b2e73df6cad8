"""`resilience run` as a subprocess: memory refusal, startup line, handler check, SIGHUP."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_process import CliProcess, http

pytestmark = pytest.mark.slow

HANDLER = "async def handle(payload):\n    pass\n"


def run(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m resilience ARGS` to completion, without QUEUE_BACKEND unless ``env`` sets it."""
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("RESILIENCE_", "REDIS_"))}
    base.pop("QUEUE_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "resilience", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_refuses_the_memory_fallback_in_one_line(tmp_path: Path) -> None:
    """Without QUEUE_BACKEND, run exits 2 with one line naming it and no raw UserWarning."""
    (tmp_path / "h.py").write_text(HANDLER)
    proc = run(tmp_path, "run", "h:handle")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "QUEUE_BACKEND" in lines[0]
    assert "Warning" not in proc.stderr


def test_run_refuses_a_handler_that_cannot_take_a_payload(tmp_path: Path) -> None:
    """A handler without room for one positional payload argument is refused at startup."""
    (tmp_path / "h.py").write_text("async def handle(payload, extra):\n    pass\n")
    proc = run(tmp_path, "run", "h:handle", env={"QUEUE_BACKEND": "memory"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "resilience: error: h:handle cannot take one payload argument "
        "(missing a required argument: 'extra'): the handler is called as await handler(payload)"
    ]


def test_run_prints_one_startup_line_with_the_facts(tmp_path: Path) -> None:
    """With the memory backend asked for, one JSON startup line gives version, backend, policy,
    concurrency and the health address; the backend's warning is a log line, not a raw one."""
    (tmp_path / "h.py").write_text(HANDLER)
    (tmp_path / "p.toml").write_text("[retry]\nattempts = 4\n")
    cli = CliProcess(
        tmp_path,
        [
            "run",
            "h:handle",
            "--memory",
            "--policy",
            "p.toml",
            "--concurrency",
            "3",
            "--http",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        {},
    )
    try:
        line = cli.started()
        status, body, _ = http("GET", f"{line['http']}/healthz")
        assert (status, body) == (200, {"alive": True})
        assert cli.stop() == 0
    finally:
        cli.kill()
    from resilience import __version__

    assert line["version"] == __version__
    assert line["backend"] == "memory"
    assert line["concurrency"] == 3
    assert "retry(attempts=4" in line["policy"]
    assert line["http"].startswith("http://127.0.0.1:")
    assert sum("resilience run started" in x for x in cli.lines) == 1
    assert "UserWarning" not in cli.text()


def test_sighup_reloads_a_good_policy_and_refuses_a_bad_one(tmp_path: Path) -> None:
    """SIGHUP puts an edited policy in force; a broken file is refused in one line and the
    running policy stays (the consumer keeps running and stops cleanly)."""
    (tmp_path / "h.py").write_text(HANDLER)
    policy = tmp_path / "p.toml"
    policy.write_text("[retry]\nattempts = 2\n")
    cli = CliProcess(
        tmp_path,
        ["run", "h:handle", "--policy", "p.toml", "--http", "127.0.0.1:0", "--log-format", "json"],
        {"QUEUE_BACKEND": "memory"},
    )
    try:
        base = cli.started()["http"]
        policy.write_text("[retry]\nattempts = 7\n")
        cli.signal(signal.SIGHUP)
        reloaded = cli.wait_event("policy reloaded (SIGHUP)")
        assert "retry(attempts=7" in reloaded["event"]
        policy.write_text("[retry]\nattempts = -1\n")
        cli.signal(signal.SIGHUP)
        refused = cli.wait_event("policy reload (SIGHUP) refused")
        assert "retry.attempts" in refused["event"]
        assert refused["level"] == "error"
        status, body, _ = http("GET", f"{base}/readyz")
        assert status == 200, body
        policy.write_text("[retry]\nattempts = 3\n")
        status, body, _ = http("POST", f"{base}/policy/reload")
        assert status == 200
        assert body["reloaded"] is True
        assert "retry(attempts=3" in body["message"]
        assert cli.stop() == 0
    finally:
        cli.kill()
    assert "Traceback" not in cli.text()
    assert sum("refused" in x for x in cli.lines) == 1


def test_run_with_a_busy_http_port_is_one_line(tmp_path: Path) -> None:
    """--http on a port already in use ends the command at startup with one line, exit 2."""
    import socket

    (tmp_path / "h.py").write_text(HANDLER)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run(
            tmp_path,
            "run",
            "h:handle",
            "--memory",
            "--http",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
        )
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if not x.startswith("{")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"resilience: error: --http 127.0.0.1:{port}: cannot listen")
    assert "Traceback" not in proc.stderr
