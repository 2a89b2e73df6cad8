"""The ``resilience`` command line: run, demo, help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.cli import main


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current directory holding a handler module, with QUEUE_BACKEND=memory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    for name in list(os.environ):
        if name.startswith("RESILIENCE_"):
            monkeypatch.delenv(name)
    MemoryBackend.reset_shared()
    return tmp_path


def write_handler(workdir: Path, name: str, body: str) -> None:
    (workdir / f"{name}.py").write_text(textwrap.dedent(body))


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """resilience --help names the run and demo commands."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out
    assert "demo" in out


def test_run_processes_messages_from_the_configured_backend(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run MODULE:HANDLER consumes the memory backend under the policy file and exits 0."""
    write_handler(
        workdir,
        "orders_handler",
        """
        import json
        from pathlib import Path

        calls = {}

        async def handle(payload):
            calls[payload["i"]] = calls.get(payload["i"], 0) + 1
            if payload["i"] == 1 and calls[1] < 2:
                raise ConnectionError("flaky")
            with Path("seen.jsonl").open("a") as fh:
                fh.write(json.dumps(payload) + "\\n")
        """,
    )
    (workdir / "policy.toml").write_text(
        '[retry]\nattempts = 3\nbackoff = "fixed"\ninitial = 0\nmaximum = 0\n'
    )
    shared = MemoryBackend()
    import asyncio

    async def fill() -> None:
        for i in range(3):
            await shared.publish("orders", {"i": i})

    asyncio.run(fill())
    code = main(["run", "orders_handler:handle", "--policy", "policy.toml", "--max-messages", "3"])
    assert code == 0
    seen = [json.loads(line)["i"] for line in (workdir / "seen.jsonl").read_text().splitlines()]
    assert seen == [0, 1, 2]
    err = capsys.readouterr().err
    assert "UserWarning" not in err
    assert "development/testing only" in err  # the memory backend's warning, as a log line
    assert "settled 3 message(s)" in err
    assert "retried 1" in err
    assert shared.unacked() == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "no_colon"], "MODULE:FUNCTION"),
        (["run", "missing_module:handle"], "cannot import module 'missing_module'"),
        (["run", "sync_handler:missing"], "has no attribute 'missing'"),
        (["run", "sync_handler:handle"], "must be an async function"),
        (["run", "sync_handler:handle_async", "--policy", "nope.toml"], "policy file not found"),
        (["run", "sync_handler:handle_async", "--concurrency", "0"], "--concurrency"),
    ],
)
def test_run_errors_are_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Bad handler paths and policies give exit code 2 and one line, no traceback."""
    write_handler(
        workdir,
        "sync_handler",
        """
        def handle(payload):
            pass

        async def handle_async(payload):
            pass
        """,
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_run_invalid_policy_names_the_key(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid policy file is reported with the offending key."""
    write_handler(workdir, "h", "async def handle(payload):\n    pass\n")
    (workdir / "bad.toml").write_text("[retry]\nattempts = -2\n")
    assert main(["run", "h:handle", "--policy", "bad.toml"]) == 2
    assert "retry.attempts must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_run_stops_cleanly_on_sigterm(workdir: Path) -> None:
    """A running `resilience run` process drains and exits 0 on SIGTERM."""
    write_handler(workdir, "idle", "async def handle(payload):\n    pass\n")
    env = {**os.environ, "QUEUE_BACKEND": "memory", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "resilience", "run", "idle:handle"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        # Wait until the process is up (its imports done) before signalling it.
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
            if Path(f"/proc/{proc.pid}/status").exists():
                status = Path(f"/proc/{proc.pid}/status").read_text()
                if "SigCgt" in status and int(status.split("SigCgt:")[1].split()[0], 16) & (
                    1 << (signal.SIGTERM - 1)
                ):
                    break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "settled 0 message(s)" in err


def test_demo_json_accounts_for_every_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The demo processes every order: retries, and dead-letters the invalid ones durably."""
    dlq = str(tmp_path / "dlq.sqlite3")
    assert main(["demo", "--json", "--messages", "30", "--seed", "7", "--dlq", dlq]) == 0
    summary = json.loads(capsys.readouterr().out)
    dead = summary["outcomes"].get("dead_lettered", 0)
    assert dead > 0
    assert summary["dead_letters"]["total"] == dead
    assert summary["dead_letters"]["by_reason"] == {"non_retryable": dead}
    assert main(["dlq", "list", "--db", dlq, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == dead
    assert summary["published"] == 30
    assert summary["settled"] == 30
    assert sum(summary["outcomes"].values()) == 30
    assert summary["unacked"] == 0
    assert summary["outcomes"].get("retried", 0) > 0
    assert summary["retries"] >= summary["outcomes"].get("retried", 0)


def test_demo_text_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The readable demo summary names each outcome and how to list dead letters."""
    assert main(["demo", "--messages", "40", "--dlq", str(tmp_path / "d.sqlite3")]) == 0
    out = capsys.readouterr().out
    assert "Processed 40 of 40 orders" in out
    assert "succeeded after retry" in out
    assert "resilience dlq list" in out


@pytest.mark.slow
def test_demo_with_console_spans_keeps_stdout_json(tmp_path: Path) -> None:
    """`demo --otel console --json` prints one span per message on stderr and JSON on stdout."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resilience",
            "demo",
            "--json",
            "--otel",
            "console",
            "--messages",
            "8",
            "--dlq",
            str(tmp_path / "d.sqlite3"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["settled"] == 8
    assert proc.stderr.count('"name": "process orders"') >= 8


def test_run_log_lines_carry_the_message_context(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --log-format json, a handler's own stdlib log line carries message id and key."""
    write_handler(
        workdir,
        "logging_handler",
        """
        import logging

        async def handle(payload):
            logging.getLogger("app").warning("handling order %s", payload["i"])
        """,
    )
    shared = MemoryBackend()
    import asyncio

    asyncio.run(shared.publish("orders", {"i": 1}))
    code = main(["run", "logging_handler:handle", "--max-messages", "1", "--log-format", "json"])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if x.get("logger") == "app"]
    assert line["event"] == "handling order 1"
    assert line["key"] == "orders"
    assert line["message_id"] == "1"
    assert line["attempt"] == 1


def test_run_backend_failure_is_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that fails while consuming ends the command with exit 2 and one line."""
    write_handler(workdir, "h2", "async def handle(payload):\n    pass\n")

    class Refusing(MemoryBackend):
        async def deliveries(self, *, group: str | None = None) -> Any:
            raise PermissionError("NOAUTH Authentication required")
            yield  # type: ignore[unreachable]  # pragma: no cover

    import abe.backends.message_queue.loader as loader

    monkeypatch.setattr(loader, "load_backend", lambda: Refusing.isolated())
    assert main(["run", "h2:handle", "--log-format", "json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "resilience: error: the consumer stopped: PermissionError: NOAUTH Authentication required"
    )


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_demo_refuses_zero_messages_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str]
) -> None:
    """demo --messages 0 (with or without --json) is refused with one line instead of hanging."""
    assert main(["demo", "--messages", "0", "--dlq", str(tmp_path / "d.sqlite3"), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "resilience: error: --messages must be >= 1, got 0"
