"""``resilience demo``: the README's main job, on the embedded in-memory backend.

Publishes a batch of orders to a handler whose dependency fails in the usual ways (transient
errors, permanent errors, slow calls), processes them through the demo policy and prints what
happened to each kind of message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from typing import Any

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.cli import CliError
from resilience.cli._common import quiet_logs, setup_otel
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import DEFAULT_PATH, Filter, SQLiteStore, describe, summarize
from resilience.events import MessageSettled, Outcome, RetryScheduled
from resilience.policy import Policy

KINDS = ("ok", "transient", "permanent", "slow")

DEMO_POLICY: dict[str, Any] = {
    "retry": {"attempts": 4, "backoff": "full_jitter", "initial": 0.02, "maximum": 0.2},
    "timeout": {"attempt": 0.2, "total": 5.0},
    "classify": {"terminal": ["ValueError"]},
}
"""The policy the demo runs (the same layout as a TOML policy file)."""


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="process a batch with injected failures on the in-memory backend",
        description="Publish orders to an in-memory queue, fail some of them on purpose "
        "(transient errors, invalid orders, slow calls) and show what the resilience policy "
        "made of each. Needs no server.",
    )
    parser.add_argument(
        "--messages", type=int, default=40, metavar="N", help="orders to publish (default 40, >= 1)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, metavar="N", help="messages in flight (default 8)"
    )
    parser.add_argument(
        "--seed", type=int, default=7, help="seed for the injected faults (default 7)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--dlq",
        metavar="PATH",
        default=DEFAULT_PATH,
        help=f"SQLite dead-letter store to write to (default {DEFAULT_PATH})",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the pipeline's log lines on stderr"
    )
    parser.add_argument("--otel", choices=("console", "otlp"), help="export traces and metrics")
    parser.set_defaults(func=_main)


class _Dependency:
    """The flaky downstream service the demo handler calls."""

    def __init__(self, seed: int) -> None:
        self.calls: Counter[int] = Counter()
        self.rng = random.Random(seed)

    async def handle(self, payload: dict[str, Any]) -> None:
        order = int(payload["order"])
        kind = payload["kind"]
        self.calls[order] += 1
        attempt = self.calls[order]
        if kind == "transient" and attempt <= 2:
            raise ConnectionError(f"order {order}: upstream connection reset")
        if kind == "permanent":
            raise ValueError(f"order {order}: invalid order (missing customer)")
        if kind == "slow" and attempt == 1:
            await asyncio.sleep(1.0)  # longer than the attempt timeout: cancelled, then retried
        await asyncio.sleep(self.rng.uniform(0.0005, 0.003))


def demo_policy(dlq_path: str) -> dict[str, Any]:
    """The demo's policy, dead-lettering into the SQLite store at ``dlq_path``."""
    return {
        **DEMO_POLICY,
        "dead_letter": {"destination": "sqlite", "path": dlq_path},
        "telemetry": {"service_name": "resilience-demo"},
    }


async def run_demo(
    messages: int, concurrency: int, seed: int, dlq_path: str = DEFAULT_PATH
) -> dict[str, Any]:
    """Run the demo and return its summary."""
    rng = random.Random(seed)
    backend = MemoryBackend.isolated()
    plan = [rng.choices(KINDS, weights=(70, 15, 5, 10))[0] for _ in range(messages)]
    for order, kind in enumerate(plan):
        await backend.publish("orders", {"order": order, "kind": kind})
    dependency = _Dependency(seed)
    policy = demo_policy(dlq_path)
    consumer = ResilientConsumer(backend, policy=Policy.from_dict(policy), concurrency=concurrency)
    settled: list[MessageSettled] = []
    retries = 0
    done = asyncio.Event()

    def listen(event: object) -> None:
        nonlocal retries
        if isinstance(event, RetryScheduled):
            retries += 1
        elif isinstance(event, MessageSettled):
            settled.append(event)
            if len(settled) == messages:
                done.set()

    consumer.events.subscribe(listen)
    started = time.perf_counter()
    wall_start = time.time()
    task = asyncio.create_task(consumer.run(dependency.handle))
    if messages:
        await done.wait()
    elapsed = time.perf_counter() - started
    await consumer.shutdown()
    await task
    dead = await summarize(SQLiteStore(dlq_path), Filter(since=wall_start))
    by_kind: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    id_to_kind = {str(i + 1): kind for i, kind in enumerate(plan)}
    for event in settled:
        by_kind[id_to_kind.get(event.message_id or "", "ok")][event.outcome.value] += 1
    outcomes = Counter(event.outcome.value for event in settled)
    reasons = Counter(event.reason for event in settled if event.reason)
    durations = sorted(event.duration for event in settled)
    return {
        "published": messages,
        "settled": len(settled),
        "outcomes": dict(outcomes),
        "terminal_reasons": dict(reasons),
        "by_kind": {kind: dict(counts) for kind, counts in by_kind.items() if counts},
        "retries": retries,
        "handler_calls": sum(dependency.calls.values()),
        "unacked": len(backend.unacked()),
        "seconds": round(elapsed, 3),
        "latency_ms": {
            "p50": _ms(_quantile(durations, 0.5)),
            "p95": _ms(_quantile(durations, 0.95)),
            "max": _ms(durations[-1] if durations else 0.0),
            "mean": _ms(statistics.fmean(durations) if durations else 0.0),
        },
        "dead_letters": {
            "total": dead.total,
            "by_reason": dict(dead.by_reason),
            "store": dead.destination,
        },
        "dead_letter_help": describe(dead, db=None if dlq_path == DEFAULT_PATH else dlq_path),
        "policy": policy,
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def render(summary: dict[str, Any]) -> str:
    """The human-readable summary."""
    out = summary["outcomes"]
    lines = [
        f"Processed {summary['settled']} of {summary['published']} orders in "
        f"{summary['seconds']:.2f}s ({summary['handler_calls']} handler calls, "
        f"{summary['retries']} retries)",
        "",
        f"  succeeded first time   {out.get(Outcome.SUCCESS.value, 0):>5}",
        f"  succeeded after retry  {out.get(Outcome.RETRIED.value, 0):>5}",
        f"  dead-lettered          {out.get(Outcome.DEAD_LETTERED.value, 0):>5}",
        f"  failed terminally      {out.get(Outcome.FAILED.value, 0):>5}",
        f"  dropped                {out.get(Outcome.DROPPED.value, 0):>5}",
        "",
        "By injected fault:",
    ]
    for kind, counts in summary["by_kind"].items():
        parts = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
        lines.append(f"  {kind:<10} {parts}")
    if summary["terminal_reasons"]:
        lines.append("")
        lines.append(
            "Terminal reasons: "
            + ", ".join(
                f"{reason} {n}" for reason, n in sorted(summary["terminal_reasons"].items())
            )
        )
    lat = summary["latency_ms"]
    lines += [
        "",
        f"Latency per message: p50 {lat['p50']} ms, p95 {lat['p95']} ms, max {lat['max']} ms",
        f"Unacknowledged deliveries left: {summary['unacked']}",
        "Policy: " + json.dumps(summary["policy"]),
        "",
        *summary["dead_letter_help"],
    ]
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    if args.messages < 1:
        raise CliError(f"--messages must be >= 1, got {args.messages}")
    if args.concurrency < 1:
        raise CliError(f"--concurrency must be >= 1, got {args.concurrency}")
    quiet_logs(verbose=args.verbose)
    # Spans go to stderr so that stdout keeps only the summary (valid JSON with --json).
    shutdown_otel = setup_otel(args.otel, "resilience-demo", out=sys.stderr)
    try:
        summary = asyncio.run(run_demo(args.messages, args.concurrency, args.seed, args.dlq))
    finally:
        shutdown_otel()
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print(render(summary))
    return 0
