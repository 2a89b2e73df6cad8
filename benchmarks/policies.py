"""Compare resilience policies under simulated faults (virtual time, deterministic).

A thin front end to ``resilience bench policies`` (the engine is :mod:`resilience.bench`)::

    python benchmarks/policies.py --help
"""

from __future__ import annotations

import sys

from resilience.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "policies", *sys.argv[1:]]))
