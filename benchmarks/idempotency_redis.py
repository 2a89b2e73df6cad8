"""Redis round trips per message and throughput with and without the idempotency layer.

The rows ``resilience bench redis`` prints last, alone (the engine is
:mod:`resilience.bench.redis_idempotency`)::

    python benchmarks/idempotency_redis.py [--url URL] [--messages 20000] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

from resilience.bench.redis_idempotency import MAX_MESSAGES, format_idempotency
from resilience.bench.redis_throughput import measure_idempotency_alone

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="as 'resilience bench redis --url'")
    parser.add_argument("--messages", type=int, default=MAX_MESSAGES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    report = measure_idempotency_alone(url=args.url, messages=args.messages, rounds=args.rounds)
    print(format_idempotency(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
