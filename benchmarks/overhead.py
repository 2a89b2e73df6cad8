"""Per-message overhead of the pipeline against the bare consumer and peer libraries.

A thin front end to ``resilience bench overhead`` (the engine is :mod:`resilience.bench`)::

    python benchmarks/overhead.py --help
"""

from __future__ import annotations

import sys

from resilience.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "overhead", *sys.argv[1:]]))
