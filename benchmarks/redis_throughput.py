"""Messages per second draining a Redis stream: ResilientConsumer vs hand-written loops.

A thin front end to ``resilience bench redis`` (the engine is :mod:`resilience.bench`)::

    python benchmarks/redis_throughput.py --help
"""

from __future__ import annotations

import sys

from resilience.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "redis", *sys.argv[1:]]))
