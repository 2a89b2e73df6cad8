"""Instructions per message or per statement, counted by valgrind's callgrind.

Counts are deterministic, so they compare code on a busy machine where timings do not. Two
kinds of count, each the difference of two runs so that start-up cancels out:

* a row of ``resilience bench overhead``: one contender draining 500 and then 3,000 messages
  through ``resilience.bench.overhead._drain``, the difference divided by 2,500; the row
  ``publish`` only publishes the messages (subtract it to get the consumer's share)::

      python benchmarks/callgrind_cost.py --row bare --row "pipeline+listener" --row publish

* a statement: run 2,000 and 22,000 times in a loop inside a function, minus the same loop
  with ``pass``, divided by 20,000 (``--setup`` is code run first, in the same namespace)::

      python benchmarks/callgrind_cost.py --setup "from resilience.events import EventBus; \\
          bus = EventBus(lambda e: None)" --stmt "bus.emit(1)"

Every run uses ``PYTHONHASHSEED=0`` and this interpreter; valgrind must be installed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

_DRAIN = (
    "import asyncio\n"
    "from resilience.bench._contenders import CONTENDERS as C\n"
    "from resilience.bench.overhead import _drain\n"
    "asyncio.run(_drain({{c.name: c for c in C}}[{row!r}].setup, {n}))\n"
)
_PUBLISH = (
    "import asyncio\n"
    "from abe.backends.message_queue.service.memory import MemoryBackend\n"
    "from resilience.bench._contenders import KEY\n"
    "async def main(n):\n"
    "    backend = MemoryBackend.isolated(keys=[KEY])\n"
    "    for i in range(n):\n"
    "        await backend.publish_message(KEY, {{'n': i}})\n"
    "asyncio.run(main({n}))\n"
)
_LAYOUT = "_layout = [object() for _ in range({k} * 251)] + [bytearray({k} * 4099)]\n"
"""Code run first to shift where later objects are allocated: layout ``k`` of ``--layouts``.

A count is exact for one build of the code, but every change to any module moves where
objects land in memory, and with that how many probes the dictionaries and sets keyed by
object identity need (the event loop's and asyncio's among them): a per-message count moves
by up to about 1,000 instructions between two builds that run the same statements. Averaging
over a few layouts shrinks that noise; compare two versions of the code with ``--layouts 3``
or more, and run one count at a time (a second valgrind alongside slows the runs enough for
timer-driven code paths to run more often)."""
_LOOP = "{setup}\ndef _loop(n):\n    for _ in range(n):\n        {stmt}\n_loop({n})\n"


def instructions(code: str) -> int:
    """Instructions callgrind counts for ``python -c code``."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            code,
        ],
        env=dict(os.environ, PYTHONHASHSEED="0"),
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"the run failed:\n{result.stderr[-3000:]}")
    return int(found.group(1))


def per_message(row: str, layouts: int = 1) -> float:
    """Instructions per message of one overhead row (or ``publish``), the mean over
    ``layouts`` heap layouts (see :data:`_LAYOUT`)."""
    template = _PUBLISH if row == "publish" else _DRAIN
    counts = []
    for layout in range(layouts):
        pad = _LAYOUT.format(k=layout) if layout else ""
        few = instructions(pad + template.format(row=row, n=500))
        many = instructions(pad + template.format(row=row, n=3000))
        counts.append((many - few) / 2500)
    return sum(counts) / len(counts)


def per_statement(setup: str, stmt: str) -> float:
    """Instructions per execution of ``stmt`` after ``setup``."""

    def count(body: str, n: int) -> int:
        return instructions(_LOOP.format(setup=setup, stmt=body, n=n))

    empty = count("pass", 22000) - count("pass", 2000)
    return (count(stmt, 22000) - count(stmt, 2000) - empty) / 20000


def main() -> None:
    """Print one line per row and per statement: its name and its count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", action="append", default=[], help="an overhead row, or publish")
    parser.add_argument("--setup", default="", help="code run before the statements")
    parser.add_argument("--stmt", action="append", default=[], help="a statement to count")
    parser.add_argument(
        "--layouts",
        type=int,
        default=1,
        help="mean of each row over this many heap layouts (default 1: see _LAYOUT)",
    )
    args = parser.parse_args()
    if args.layouts < 1:
        parser.error("--layouts must be at least 1")
    for row in args.row:
        print(f"{row}\t{per_message(row, args.layouts):,.0f}", flush=True)
    for stmt in args.stmt:
        print(f"{stmt}\t{per_statement(args.setup, stmt):,.0f}", flush=True)


if __name__ == "__main__":
    main()
