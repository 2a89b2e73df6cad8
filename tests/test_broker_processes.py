"""The multi-process broker tests' record reader (tests/broker_processes.py)."""

from __future__ import annotations

from pathlib import Path

from tests.broker_processes import recorded


def test_recorded_counts_whole_lines_only(tmp_path: Path) -> None:
    """A line a worker is still appending (no newline yet, maybe not even its colon) is left
    for the next read instead of failing it; duplicates are kept."""
    record = tmp_path / "record.txt"
    assert recorded(record) == []
    record.write_text("live:1\ndoomed:2\nlive:1\nli")
    assert recorded(record) == [1, 2, 1]
    record.write_text("live:1\ndoomed:2\nlive:1\nlive:3\n")
    assert recorded(record) == [1, 2, 1, 3]
