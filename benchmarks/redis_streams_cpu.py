"""CPU time of the consumer process per drain across many Redis streams: the stream rows of
``resilience bench redis`` measured by the process's own work instead of the wall clock.

Each round drains ``--messages`` entries spread round-robin over each of ``--streams`` stream
counts with both contenders of :mod:`resilience.bench.redis_streams` (the full pipeline over
``RedisBackend`` and the hand-written redis-py loop), in alternating order, against a throw-away
``redis-server`` (never the shared one). Prints, per stream count, the medians of the CPU seconds
of the process (``time.process_time()`` around the drain; the Redis server's own time is not in
them) and the hand-written loop's over the consumer's, which is the wall-clock ratio the bench
reports when the machine has no spare core; also the best and median wall-clock ratios::

    python benchmarks/redis_streams_cpu.py [--messages 50000] [--streams 1,100,1000] [--rounds 5]

To compare two versions of the code, run this file with ``PYTHONPATH`` pointing at each
checkout in turn (same interpreter, same packages).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from resilience.bench import redis_streams
from resilience.bench.redis_throughput import _client, redis_server
from resilience.bench.report import quiet_policy_advice

CONTENDERS = ("ResilientConsumer", "hand-written")


async def _rounds(url: str, messages: int, counts: list[int], rounds: int) -> dict[Any, Any]:
    client = await _client(url)
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    try:
        for r in range(rounds + 1):  # round 0: an untimed warm-up of 2,000 entries
            for count in counts:
                order = CONTENDERS if r % 2 else CONTENDERS[::-1]
                for name in order:
                    keys = [f"cpu-bench:{uuid.uuid4().hex[:8]}:{i}" for i in range(count)]
                    n = messages if r else 2000
                    await redis_streams._prefill(client, keys, n)
                    cpu, wall = time.process_time(), time.perf_counter()
                    await redis_streams.CONTENDERS[name](client, url, keys, n)
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                    if r:
                        results.setdefault((count, name), []).append((cpu, n / wall))
                    await client.delete(*keys)
    finally:
        await client.aclose()
    return results


def main() -> None:
    """Run the rounds and print one line per stream count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--streams", default="1,100,1000")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    counts = [int(c) for c in args.streams.split(",")]
    with redis_server() as url, quiet_policy_advice():
        results = asyncio.run(_rounds(url, args.messages, counts, args.rounds))
    for count in counts:
        ours, hand = results[(count, CONTENDERS[0])], results[(count, CONTENDERS[1])]
        cpu_ours = statistics.median(c for c, _ in ours)
        cpu_hand = statistics.median(c for c, _ in hand)
        best = max(w for _, w in ours) / max(w for _, w in hand)
        median = statistics.median(w for _, w in ours) / statistics.median(w for _, w in hand)
        print(
            f"{count:>5} streams: CPU s ResilientConsumer {cpu_ours:.3f}, hand-written "
            f"{cpu_hand:.3f}, hand-written / ResilientConsumer {cpu_hand / cpu_ours:.2f}; "
            f"msg/s ratio best {best:.2f}, median {median:.2f}"
        )


if __name__ == "__main__":
    main()
