"""README.md stays short and opens with its two commands; documented defaults match the code."""

from __future__ import annotations

import dataclasses
import re

from docs_blocks import ROOT, blocks_of

from resilience.breaker import BreakerConfig

DEMO = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/resilience demo"
TESTS = "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest"


def test_readme_opens_with_the_two_commands() -> None:
    """The README's first two code blocks are the demo and test-suite commands, before any
    section, and they are visibly excluded from execution (they build a virtual environment)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first, second = blocks_of(ROOT / "README.md")[:2]
    assert [first.source.strip(), second.source.strip()] == [DEMO, TESTS]
    assert first.skip
    assert second.skip
    assert text.index(TESTS) < text.index("\n## ")


def test_readme_is_short() -> None:
    """The README stays a front page (at most about 200 lines); the manual lives in docs/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs the README's test command verbatim, then builds the docs strictly."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TESTS in script
    assert "mkdocs build --strict" in script


def test_breaker_table_defaults_match_the_code() -> None:
    """Every default in the circuit-breaker configuration table equals BreakerConfig's."""
    text = (ROOT / "docs" / "circuit-breaker.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", text, flags=re.M))
    checked = 0
    for field in dataclasses.fields(BreakerConfig):
        if field.name not in rows or field.default is None:
            continue
        assert float(rows[field.name]) == float(field.default), field.name  # type: ignore[arg-type]
        checked += 1
    assert checked >= 4, rows
