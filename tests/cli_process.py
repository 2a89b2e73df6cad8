"""A `resilience run` subprocess whose JSON log lines the test can wait for, and HTTP helpers."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CliProcess:
    """``python -m resilience run ...`` with ``--log-format json``; stderr read by a thread.

    Args:
        cwd: Working directory (holds the handler module).
        args: Arguments after ``resilience``.
        env: Environment overrides (``QUEUE_BACKEND`` and friends).
    """

    def __init__(self, cwd: Path, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RESILIENCE_", "REDIS_"))}
        base.pop("QUEUE_BACKEND", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resilience", *args],
            cwd=cwd,
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def _drain(self, timeout: float) -> bool:
        """Move one new line into :attr:`lines`; ``False`` at end of output."""
        try:
            line = self._new.get(timeout=timeout)
        except queue.Empty:
            return True
        if line is None:
            self._new.put(None)
            return False
        self.lines.append(line)
        return True

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line seen so far."""
        out = []
        for line in self.lines:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0, what: str = ""
    ) -> dict[str, Any]:
        """The first JSON log line (old or new) matching ``predicate``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            events = self.events()
            for event in events[seen:]:
                if predicate(event):
                    return event
            seen = len(events)
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line {what} within {timeout}s:\n" + self.text())
            if not self._drain(0.05):  # the process closed stderr: nothing more will come
                events = self.events()
                for event in events[seen:]:
                    if predicate(event):
                        return event
                raise AssertionError(f"process ended without a log line {what}:\n" + self.text())

    def wait_event(self, text: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first JSON log line whose event contains ``text``."""
        return self.wait_for(lambda e: text in str(e.get("event", "")), timeout, repr(text))

    def started(self) -> dict[str, Any]:
        """The startup line."""
        return self.wait_event("resilience run started")

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process."""
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, collect the rest of stderr; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        while self._drain(1.0):
            pass
        return code

    def kill(self) -> None:
        """Kill the process if it still runs, and close its pipes (cleanup)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def text(self) -> str:
        """Everything read from stderr so far."""
        return "\n".join(self.lines)


def http(method: str, url: str) -> tuple[int, Any, str]:
    """``(status, parsed JSON or None, body)`` of one request."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    return status, data, body


def poll(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``check`` every 50 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
