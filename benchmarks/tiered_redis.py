"""Healthy-message latency on a real Redis while 1,000 messages retry: tiered vs in process.

Each run publishes 1,000 messages whose handler fails ``--failures`` times before succeeding,
then 40 healthy messages, one every 50 ms, to the same stream, and consumes them with
``concurrency`` 4 and a fixed retry wait of ``--wait`` seconds (the production example's 1 s,
scaled down). Four runs, in one process, interleaved ``--rounds`` times: no failures (the
baseline), tiered retry (``in_process = 1``: every wait in Redis's delay set) with the due
entries' re-adds paced by the stream's backlog (the default) and unpaced (``backlog = 0``: every
due entry re-added at once), and every wait in process. Prints the medians over rounds of the
healthy messages' p50 and max latency, all of them and only those published once every failing
message had made its first attempt (while retries come back), and of the time until everything
finished::

    python benchmarks/tiered_redis.py [--url redis://127.0.0.1:6379/0] [--rounds 3]

Wall-clock figures on a shared machine are noisy: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
import uuid
from typing import Any

from abe.backends.message_queue.service.redis import RedisBackend
from resilience.consumer import ResilientConsumer
from resilience.policy import Policy

MESSAGES = 1000
HEALTHY = 40


async def run(
    url: str, failures: int, wait: float, in_process: int | None, backlog: int | None
) -> tuple[float, ...]:
    """One run; returns (healthy p50, healthy max, the same for the healthy messages published
    while retries come back, seconds until all finished)."""
    stream = f"bench-tiered:{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(url, streams=[stream], group="g", block=0.1, batch_size=50)
    publisher = RedisBackend(url, streams=[stream], group="g")
    attempts: dict[int, int] = {}
    done: list[int] = []
    latencies: list[tuple[float, float]] = []  # (published at, latency)
    first_attempts_done = [float("inf")]

    async def handler(payload: dict[str, Any]) -> None:
        if "healthy" in payload:
            latencies.append((payload["t"], time.time() - payload["t"]))
            return
        n = payload["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if len(attempts) == MESSAGES and attempts[n] == 1:
            first_attempts_done[0] = time.time()
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
    while backend.delay_scheduler is None:
        await asyncio.sleep(0.001)
    if backlog is not None:
        backend.delay_scheduler.backlog = backlog
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
    every = sorted(latency for _, latency in latencies)
    later = sorted(latency for t, latency in latencies if t >= first_attempts_done[0])
    later = later or [math.nan]
    return every[len(every) // 2], every[-1], later[len(later) // 2], later[-1], total


async def main() -> None:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--failures", type=int, default=5)
    parser.add_argument("--wait", type=float, default=0.05)
    args = parser.parse_args()
    runs = {
        "no failures": (0, 1, None),
        "tiered, paced": (args.failures, 1, None),
        "tiered, unpaced": (args.failures, 1, 0),
        "every wait in process": (args.failures, None, None),
    }
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (failures, in_process, backlog) in runs.items():
            results[name].append(await run(args.url, failures, args.wait, in_process, backlog))
    print(f"{MESSAGES} messages failing {args.failures} times, {args.wait:g} s waits, ")
    print(f"concurrency 4, {HEALTHY} healthy messages; medians of {args.rounds} rounds")
    print(f"{'':24s} {'healthy (all)':>23s}   {'while retries come back':>23s}")
    print(f"{'':24s} {'p50':>10s} {'max':>12s}   {'p50':>10s} {'max':>12s}")
    for name, rows in results.items():
        p50, worst, p50_back, worst_back, total = (
            statistics.median(col) for col in zip(*rows, strict=True)
        )
        back = (  # none published after the first attempts when slots sleep through waits
            f"{p50_back * 1000:7.1f} ms {worst_back * 1000:9.1f} ms"
            if math.isfinite(p50_back)
            else f"{'-':>10s} {'-':>12s}"
        )
        print(
            f"{name:24s} {p50 * 1000:7.1f} ms {worst * 1000:9.1f} ms   {back}   "
            f"all finished in {total:5.1f} s"
        )


if __name__ == "__main__":
    asyncio.run(main())
