"""The docs example collector finds every block and reads its markers the documented way."""

from __future__ import annotations

from pathlib import Path

import pytest
from docs_blocks import all_blocks, blocks_of, console_commands

PAGE = """# A page

```python title="app.py"
print("hi")
```

<!-- example: skip: a fragment -->

```python
await x
```

<!-- example: pytest, redis -->
```python
def test_x() -> None: ...
```

- a list item with a block:

  ```toml
  [retry]
  attempts = 2
  ```

```
no language
```

<!-- example: slow -->
```bash
true
```

```ini
a: 1
```

<!-- example: rabbitmq, RABBITMQ_QUEUES=orders -->
```bash
true
```

<!-- example: redis, nats -->
```bash
true
```
"""


@pytest.fixture
def page(tmp_path: Path) -> Path:
    """A checkout-like tree with README.md and the page at docs/guide/page.md."""
    (tmp_path / "README.md").write_text("# Read me\n", encoding="utf-8")
    path = tmp_path / "docs" / "guide" / "page.md"
    path.parent.mkdir(parents=True)
    path.write_text(PAGE, encoding="utf-8")
    return path


def test_blocks_carry_language_title_and_markers(page: Path) -> None:
    """Languages, titles, skip reasons and flags are read from the fence and the comment."""
    blocks = blocks_of(page)
    assert [b.language for b in blocks] == [
        "python",
        "python",
        "python",
        "toml",
        "",
        "bash",
        "ini",
        "bash",
        "bash",
    ]
    assert blocks[0].title == "app.py"
    assert blocks[0].source == 'print("hi")\n'
    assert blocks[1].skip == "a fragment"
    assert blocks[2].flags == frozenset({"pytest", "redis"})
    assert blocks[3].source == "[retry]\nattempts = 2\n"  # the list indentation is removed
    assert blocks[0].line == 3
    assert blocks[7].flags == frozenset({"rabbitmq"})
    assert blocks[7].env == (("RABBITMQ_QUEUES", "orders"),)


def test_unknown_languages_and_markers_are_problems(page: Path) -> None:
    """A block without a known language, or with an unknown marker, is reported, not ignored."""
    problems = [(b.language, b.problem) for b in blocks_of(page) if b.problem]
    assert [language for language, _ in problems] == ["", "bash", "ini", "bash"]
    assert "needs one of the languages" in problems[0][1]
    assert "unknown example directive 'slow'" in problems[1][1]
    assert "one broker per example" in problems[3][1]


def test_every_docs_page_is_collected(page: Path, tmp_path: Path) -> None:
    """New pages anywhere under docs/ are picked up without being listed anywhere."""
    assert {b.path for b in all_blocks(tmp_path)} == {page}
    assert blocks_of(page)[0].where == f"{page}:3"


def test_console_blocks_run_only_their_commands() -> None:
    """Output lines are skipped; a trailing backslash continues a command."""
    source = "$ echo one \\\n    two\none two\n$ echo three\nthree\n"
    assert console_commands(source) == "echo one \\\n    two\necho three\n"
