"""Healthy-message latency on a real Redis while 1,000 messages retry: tiered vs in process.

Each run publishes 1,000 messages whose handler fails ``--failures`` times before succeeding,
then 40 healthy messages, one every 50 ms, to the same stream, and consumes them with
``concurrency`` 4 and a fixed retry wait of ``--wait`` seconds (the production example's 1 s,
scaled down). Three runs, in one process, interleaved ``--rounds`` times: no failures (the
baseline), tiered retry (``in_process = 1``: every wait in Redis's delay set) and every wait in
process. Prints the median over rounds of the healthy messages' p50 and max latency and of the
time until everything finished::

    python benchmarks/tiered_redis.py [--url redis://127.0.0.1:6379/0] [--rounds 3]

Wall-clock figures on a shared machine are noisy: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.policy import Policy

MESSAGES = 1000
HEALTHY = 40


async def run(url: str, failures: int, wait: float, in_process: int | None) -> tuple[float, ...]:
    """One run; returns (healthy p50, healthy max, seconds until all finished)."""
    stream = f"bench-tiered:{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(url, streams=[stream], group="g", block=0.1, batch_size=50)
    publisher = RedisBackend(url, streams=[stream], group="g")
    attempts: dict[int, int] = {}
    done: list[int] = []
    latencies: list[float] = []

    async def handler(payload: dict[str, Any]) -> None:
        if "healthy" in payload:
            latencies.append(time.time() - payload["t"])
            return
        n = payload["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if attempts[n] <= failures:
            raise ConnectionError("dependency blip")
        done.append(n)

    retry: dict[str, Any] = {"attempts": 8, "backoff": "fixed", "initial": wait, "maximum": wait}
    if in_process is not None:
        retry["in_process"] = in_process
    consumer = ResilientConsumer(backend, policy=Policy.from_dict({"retry": retry}), concurrency=4)
    await publisher.publish_many(stream, [{"n": n} for n in range(MESSAGES)])
    started = time.time()
    task = asyncio.create_task(consumer.run(handler))
    for i in range(HEALTHY):
        await publisher.publish(stream, {"healthy": i, "t": time.time()})
        await asyncio.sleep(0.05)
    while len(done) < MESSAGES or len(latencies) < HEALTHY:
        await asyncio.sleep(0.01)
    total = time.time() - started
    await consumer.shutdown()
    await task
    await backend.client.delete(stream, f"abe:delayed:{stream}")
    await backend.aclose()
    await publisher.aclose()
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[-1], total


async def main() -> None:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--failures", type=int, default=5)
    parser.add_argument("--wait", type=float, default=0.05)
    args = parser.parse_args()
    runs = {
        "no failures": (0, 1),
        "tiered (in_process = 1)": (args.failures, 1),
        "every wait in process": (args.failures, None),
    }
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (failures, in_process) in runs.items():
            results[name].append(await run(args.url, failures, args.wait, in_process))
    print(f"{MESSAGES} messages failing {args.failures} times, {args.wait:g} s waits, ")
    print(f"concurrency 4, {HEALTHY} healthy messages; medians of {args.rounds} rounds")
    for name, rows in results.items():
        p50, worst, total = (statistics.median(col) for col in zip(*rows, strict=True))
        print(
            f"{name:24s} healthy p50 {p50 * 1000:8.1f} ms   max {worst * 1000:8.1f} ms   "
            f"all finished in {total:5.1f} s"
        )


if __name__ == "__main__":
    asyncio.run(main())
