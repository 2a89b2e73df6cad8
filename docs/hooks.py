"""MkDocs hooks: the CLI reference from the argparse definitions, and the benchmark results.

* ``<!-- cli-reference -->`` in a page is replaced by the ``--help`` text of ``resilience`` and
  every sub-command, taken from :func:`resilience.cli.build_parser`, so the reference is never
  written twice.
* ``benchmarks/README.md`` (the only place measured figures are kept) and its ``results/`` files
  become the page ``benchmarks/results.md`` of the site; links to ``../benchmarks/README.md``
  in the docs point there.
* :class:`SphinxRoles`, a griffe extension (``mkdocs.yml`` loads it for mkdocstrings), renders
  the Sphinx cross-reference roles of the docstrings as code for the API reference.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import griffe
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- cli-reference -->"
RESULTS_PAGE = "benchmarks/results.md"
WIDTH = 80
"""Columns the help texts are wrapped to (argparse reads ``COLUMNS``)."""


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def cli_reference() -> str:
    """Markdown for every command: a heading, its description and its ``--help`` text."""
    os.environ["COLUMNS"] = str(WIDTH)  # argparse wraps to the terminal width: make it stable
    from resilience.cli import build_parser

    parts: list[str] = []
    for path, parser in _commands(build_parser(), ("resilience",)):
        depth = min(len(path) + 1, 4)
        parts.append(f"{'#' * depth} `{' '.join(path)}`\n")
        if parser.description:
            parts.append(f"{parser.description}\n")
        parts.append(f"```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def on_files(files: Files, config: Any) -> Files:
    """Add the benchmark results (README and result files) to the site."""
    readme = ROOT / "benchmarks" / "README.md"
    files.append(
        File.generated(config, RESULTS_PAGE, content=readme.read_text(encoding="utf-8"))
    )
    for path in sorted((ROOT / "benchmarks" / "results").glob("*")):
        if path.is_file():
            files.append(
                File.generated(config, f"benchmarks/results/{path.name}", abs_src_path=str(path))
            )
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Expand the CLI reference marker and point links to benchmarks/README.md at its page."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    prefix = "../" * page.file.src_uri.count("/")
    return markdown.replace(
        f"]({prefix}../benchmarks/README.md", f"]({prefix}{RESULTS_PAGE}"
    )


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")


def _role_as_code(match: re.Match[str]) -> str:
    name = match.group(2)
    return f"`{name.rsplit('.', 1)[-1] if match.group(1) else name}`"


class SphinxRoles(griffe.Extension):
    """``:class:`~pkg.Name``` in a docstring becomes ```Name``` (``pkg.Name`` without ``~``)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the roles of each object's docstring once it is loaded."""
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_role_as_code, obj.docstring.value)
