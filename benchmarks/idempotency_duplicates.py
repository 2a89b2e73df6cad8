"""Duplicate handler runs under redelivery, with and without the idempotency layer.

Publishes ``--messages`` orders to an in-memory backend; the producer re-publishes a share of
them (``--republish``, as after a publish timeout, same ``idempotency-key`` header), and a share
of deliveries lose their acknowledgement after the handler ran (``--lost-acks``, as when a
consumer crashes between the two: the delivery is given back and delivered again). The same
seeded traffic is consumed by a ``ResilientConsumer`` without the layer and with
``Idempotency(MemoryStore(), header="idempotency-key")``; the table counts the handler's runs
per order::

    python benchmarks/idempotency_duplicates.py [--messages 10000] [--republish 0.05]
                                                [--lost-acks 0.03] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections import Counter
from typing import Any

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.consumer import ResilientConsumer
from resilience.delivery import Delivery
from resilience.errors import Unsettled
from resilience.events import Outcome
from resilience.idempotency import MemoryStore
from resilience.pipeline import CallNext, Pipeline
from resilience.testing import run_until_settled


class AckLost(Unsettled):
    """The simulated crash between the handler and the acknowledgement."""


async def run(
    messages: int, republish: float, lost_acks: float, seed: int, layer: bool
) -> dict[str, int]:
    """Consume the seeded traffic once; returns the tally."""
    rng = random.Random(seed)
    backend = MemoryBackend.isolated()
    orders = list(range(messages))
    orders += [n for n in range(messages) if rng.random() < republish]
    rng.shuffle(orders)
    for i, n in enumerate(orders):
        payload = {"n": n, "i": i}
        await backend.publish_message("orders", payload, headers={"idempotency-key": str(n)})
    lose = {i for i in range(len(orders)) if rng.random() < lost_acks}
    deliveries = 0

    async def crash_after_handler(delivery: Delivery, call_next: CallNext) -> None:
        nonlocal deliveries
        deliveries += 1
        await call_next(delivery)
        if delivery.payload["i"] in lose and delivery.delivery_count == 1:
            raise AckLost("the process died before the acknowledgement")

    runs: Counter[int] = Counter()

    async def handler(payload: dict[str, Any]) -> None:
        runs[payload["n"]] += 1

    pipeline = Pipeline(crash_after_handler)
    if layer:
        pipeline.idempotent(MemoryStore(), header="idempotency-key")
    consumer = ResilientConsumer(backend, policy=pipeline)
    expected = len(orders) + len(lose)
    outcomes = await run_until_settled(consumer, handler, expected)
    return {
        "deliveries": deliveries,
        "handler runs": sum(runs.values()),
        "orders run twice or more": sum(1 for c in runs.values() if c > 1),
        "orders never run": messages - len(runs),
        "acked as duplicate": outcomes.counts[Outcome.DUPLICATE],
    }


async def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--republish", type=float, default=0.05)
    parser.add_argument("--lost-acks", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    results = {
        name: await run(args.messages, args.republish, args.lost_acks, args.seed, layer)
        for name, layer in (("without the layer", False), ("with Idempotency", True))
    }
    print(
        f"{args.messages} orders, {args.republish:.0%} re-published, "
        f"{args.lost_acks:.0%} acknowledgements lost, seed {args.seed}"
    )
    print(f"{'':<26}" + "".join(f"{name:>20}" for name in results))
    for row in next(iter(results.values())):
        print(f"{row:<26}" + "".join(f"{r[row]:>20}" for r in results.values()))


if __name__ == "__main__":
    asyncio.run(main())
