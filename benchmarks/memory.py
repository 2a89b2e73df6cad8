"""Resident memory growth over one million messages through the full pipeline.

A thin front end to ``resilience bench memory`` (the engine is :mod:`resilience.bench`)::

    python benchmarks/memory.py --help
"""

from __future__ import annotations

import sys

from resilience.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "memory", *sys.argv[1:]]))
