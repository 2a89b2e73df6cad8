"""Helpers of the multi-process broker tests: start workers, read what they recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("broker_worker.py")


def start_worker(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Run tests/broker_worker.py with this interpreter and ``env`` added to the environment."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def wait_ready(process: subprocess.Popen[str]) -> None:
    """Wait for the worker's ``ready`` line; fail with its stderr when it does not come."""
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != "ready":
        _, err = process.communicate(timeout=10)
        raise AssertionError(f"worker did not start ({line!r}): {err}")


def whole_lines(path: Path) -> list[str]:
    """The non-empty whole lines of a file another process appends to (none if it is missing).

    A writer appends each line with one ``write``, but a read that races it can see the start
    of a line whose end is not in the file yet (a write that crosses a page boundary is copied
    in a page at a time), so the text after the last newline is left for the next read.
    """
    if not path.exists():
        return []
    *lines, _partial = path.read_text().split("\n")
    return [line for line in lines if line]


def recorded(path: Path) -> list[int]:
    """The message numbers the workers recorded in ``path`` (duplicates kept; whole lines
    only, :func:`whole_lines`)."""
    return [int(line.rsplit(":", 1)[1]) for line in whole_lines(path)]


def stop_all(workers: list[subprocess.Popen[str]]) -> None:
    """Kill the workers still running and reap them all."""
    for process in workers:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)
