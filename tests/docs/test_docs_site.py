"""The docs site's generated pages: the CLI reference comes from the argument parsers."""

from __future__ import annotations

import argparse
import importlib.util
from types import ModuleType

import pytest
from docs_blocks import ROOT

from resilience.cli import build_parser


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_has_every_command_with_its_help(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sub-command (nested ones included) gets a heading and its own --help text."""
    hooks = _hooks()
    monkeypatch.setenv("COLUMNS", str(hooks.WIDTH))  # the hook sets it too; restored afterwards
    reference = hooks.cli_reference()
    parser = build_parser()
    commands = [
        (name, sub)
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    ]
    assert {name for name, _ in commands} >= {"demo", "run", "publish", "dlq", "bench"}
    for name, sub in commands:
        assert f"`resilience {name}`" in reference
        assert sub.format_help().rstrip() in reference
    assert "#### `resilience dlq replay`" in reference
    assert "--max-messages N" in reference


def test_cli_page_asks_for_the_generated_reference() -> None:
    """docs/cli.md holds the marker the hook replaces, so the reference is never hand-written."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert _hooks().MARKER in text
    assert "usage: resilience" not in text
