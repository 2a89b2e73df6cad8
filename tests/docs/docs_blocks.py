"""Find the fenced code blocks of the project's Markdown files, and how each one is tested.

Every fenced block of ``README.md`` and ``docs/**/*.md`` is an example the test suite runs. Its
info string names the language (the first word) and may carry ``title="app.py"``: a titled block
is also a file of the page, written into the page's working directory before any block of that
page runs (so a later shell block can ``resilience run app:handle``). An HTML comment right before
a block changes how it runs (blank lines may stand between them):

``<!-- example: skip: REASON -->``
    a deliberate fragment or a command that cannot run here; reported as a pytest skip with
    REASON.
``<!-- example: redis -->``
    needs a real Redis: it runs with ``QUEUE_BACKEND=redis``, ``REDIS_URL`` (a private
    redis-server) and ``REDIS_STREAMS=orders``, as the Redis page's setup exports them.
``<!-- example: rabbitmq -->``, ``<!-- example: nats -->``
    needs that broker: ``QUEUE_BACKEND`` names it and ``RABBITMQ_URL`` / ``NATS_URL`` point at
    the broker the broker tests use (``RABBITMQ_TEST_URL`` / ``NATS_TEST_URL``).
``<!-- example: pytest -->``
    a Python block that is a test module: it runs under pytest in the page's directory, which
    holds the page's ``pyproject.toml`` block when it has one.
``<!-- example: output -->``
    before a ``text`` block: it is exactly what the block before it prints on stdout.
``NAME=VALUE``
    an environment variable for the block (``<!-- example: rabbitmq, RABBITMQ_QUEUES=orders -->``).

Flags combine with commas (``<!-- example: pytest, redis -->``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PYTHON = frozenset({"python", "py", "python3"})
SHELL = frozenset({"bash", "sh", "shell", "console"})
LANGUAGES = PYTHON | SHELL | {"toml", "json", "yaml", "text"}
"""Languages the suite knows how to check; ``text`` is output, a picture or an error message."""

FLAGS = frozenset({"redis", "rabbitmq", "nats", "pytest", "output"})
BROKERS = ("redis", "rabbitmq", "nats")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*example:\s*(?P<body>.*?)\s*-->\s*$")
_ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')
_ENV = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    source: str
    title: str | None = None
    skip: str | None = None
    """The reason given by ``<!-- example: skip: ... -->``."""
    flags: frozenset[str] = field(default_factory=frozenset)
    env: tuple[tuple[str, str], ...] = ()
    """``NAME=VALUE`` settings of the marker."""
    problem: str | None = None
    """Why the block or its directive is malformed (the test fails with this)."""

    @property
    def where(self) -> str:
        """``docs/page.md:12``, relative to the repository."""
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path.as_posix()}:{self.line}"

    @property
    def test_id(self) -> str:
        """A readable pytest id."""
        return f"{self.where}:{self.language or 'no-language'}"


def markdown_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/, in a stable order."""
    return [root / "README.md", *sorted((root / "docs").glob("**/*.md"))]


@dataclass(frozen=True)
class _Marker:
    skip: str | None = None
    flags: frozenset[str] = frozenset()
    env: tuple[tuple[str, str], ...] = ()
    problem: str | None = None


def _directive(lines: list[str], fence_index: int) -> _Marker:
    """The ``<!-- example: ... -->`` marker before a fence (an empty one when there is none)."""
    i = fence_index - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    match = _DIRECTIVE.match(lines[i]) if i >= 0 else None
    if match is None:
        return _Marker()
    body = match.group("body")
    if body.startswith("skip"):
        reason = body[len("skip") :].lstrip(" :").strip()
        if not reason:
            return _Marker(problem="<!-- example: skip --> needs a reason: skip: WHY")
        return _Marker(skip=reason)
    words = [word.strip() for word in body.split(",") if word.strip()]
    env = tuple((m["name"], m["value"]) for m in map(_ENV.match, words) if m is not None)
    flags = frozenset(word for word in words if _ENV.match(word) is None)
    if flags - FLAGS or not words:
        allowed = ", ".join(["skip: REASON", *sorted(FLAGS), "NAME=VALUE"])
        return _Marker(problem=f"unknown example directive {body!r} (allowed: {allowed})")
    if len(flags & set(BROKERS)) > 1:
        return _Marker(problem=f"one broker per example, got {body!r}")
    return _Marker(flags=flags, env=env)


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence, info = opening.group("indent", "fence", "info")
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        info = info.strip()
        language = info.split(maxsplit=1)[0].lower() if info else ""
        attributes = dict(_ATTRIBUTE.findall(info))
        marker = _directive(lines, i)
        problem = marker.problem
        if problem is None and language not in LANGUAGES:
            known = ", ".join(sorted(LANGUAGES))
            problem = (
                f"a code block needs one of the languages {known} "
                f"(got {language or 'none'!r}); mark a fragment with <!-- example: skip: WHY -->"
            )
        if problem is None and j >= len(lines):
            problem = "the code block is never closed"
        found.append(
            Block(
                path=path,
                line=i + 1,
                language=language,
                source="\n".join(body) + "\n",
                title=attributes.get("title"),
                skip=marker.skip,
                flags=marker.flags,
                env=marker.env,
                problem=problem,
            )
        )
        i = j + 1
    return found


def all_blocks(root: Path = ROOT) -> list[Block]:
    """Every fenced block of every Markdown file the suite checks."""
    return [block for path in markdown_files(root) for block in blocks_of(path)]


def console_commands(source: str) -> str:
    """The commands of a ``console`` block (``$ `` lines and their ``\\`` continuations)."""
    commands: list[str] = []
    continued = False
    for line in source.splitlines():
        if continued:
            commands.append(line)
        elif line.startswith("$ "):
            commands.append(line[2:])
        else:
            continue
        continued = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"
