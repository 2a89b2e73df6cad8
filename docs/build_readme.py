"""Assemble README.md from the section sources in docs/ (run from the repository root).

``python docs/build_readme.py`` rewrites README.md; ``--check`` exits 1 when it is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "_core.md",
    "dead-letter.md",
    "circuit-breaker.md",
    "observability.md",
    "operations.md",
    "redis.md",
    "benchmarks.md",
    "_development.md",
)


def build() -> str:
    """The README text: the sections in order, one blank line between them."""
    parts = [(ROOT / "docs" / name).read_text(encoding="utf-8").strip("\n") for name in SECTIONS]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    text = build()
    readme = ROOT / "README.md"
    if "--check" in argv:
        if readme.read_text(encoding="utf-8") != text:
            print("README.md is out of date: run python docs/build_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
