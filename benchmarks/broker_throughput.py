"""Messages per second on Redis, RabbitMQ and NATS: the full pipeline vs a hand-written loop.

A thin front end to ``resilience bench brokers`` (the engine is :mod:`resilience.bench`)::

    python benchmarks/broker_throughput.py --help
"""

from __future__ import annotations

import sys

from resilience.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "brokers", *sys.argv[1:]]))
