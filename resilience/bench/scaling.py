"""Costs that must not grow: per-message cost against the number of keys, dead letters per second.

Two extra parts of ``resilience bench overhead``:

* **Keys.** The same consumers drain the same number of messages published round-robin over
  1, 100 and 1,000 keys of one :class:`~abe.backends.message_queue.service.memory.MemoryBackend`,
  read two ways: as a whole (every key, as the published backend is) and by name
  (``MemoryBackend(keys=[...])``, what a consumer that dead-letters into the same backend
  uses; those rows are named "<consumer>, named keys"). In interleaved rounds, each key count's
  fastest round counts; the ratio to one key shows whether the backend's cost grows with keys.
* **Dead letters.** A :class:`~resilience.consumer.ResilientConsumer` (``concurrency`` messages
  at once) whose handler rejects every message dead-letters them into a fresh SQLite store (the
  default destination, ``synchronous=FULL``): dead letters per second, each message acked only
  after the commit that holds its envelope (the time includes building each envelope, its
  traceback included, and the policy's failure path). Beside it, the store alone: ready
  envelopes written by ``concurrency`` writers at once, and one at a time with one transaction
  each (what every write cost before group commit), to show what a flush costs on this disk.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from abe.backends.message_queue.service.memory import MemoryBackend

from ._contenders import CONTENDERS, Setup
from ._drain import _drain
from .report import format_table

__all__ = [
    "DEAD_LETTER_TARGET",
    "KEY_COUNTS",
    "KEY_ROWS",
    "KEY_TARGET",
    "NAMED",
    "format_scaling",
    "measure_dead_letters",
    "measure_keys",
    "measure_scaling",
]

KEY_COUNTS = (1, 100, 1000)
KEY_TARGET = 1.5
"""Per-message cost at the most keys over the cost at one key, at most."""
KEY_CONTENDERS = ("bare", "resilient, no middleware", "resilient, retry+timeout")
"""Consumers of the overhead benchmark measured against the number of keys."""
NAMED = ", named keys"
"""Suffix of the rows whose consumer reads the keys by name (the others read every key)."""
KEY_ROWS = tuple(name + suffix for suffix in ("", NAMED) for name in KEY_CONTENDERS)
"""The rows of the key table, in order: each contender reading every key, then by name."""
DEAD_LETTER_TARGET = 2000.0
"""Dead letters per second into SQLite, at least."""

Progress = Callable[[str], None]


async def _keyed(setup: Setup, keys: int, messages: int, *, named: bool) -> float:
    """Seconds (wall time) per message for one consumer to drain ``messages`` over ``keys`` keys
    (read by name when ``named``, else every key)."""
    return await _drain(setup, messages, keys=keys, clock=time.perf_counter, named=named)


async def measure_keys(
    messages: int, rounds: int, progress: Progress | None = None
) -> dict[str, Any]:
    """Per-message cost of each key contender at each key count (interleaved rounds).

    Returns:
        ``per_message_us[row][keys]`` (fastest round) for each of :data:`KEY_ROWS`, the medians
        beside it, and one ratio per row: most keys over one key, against :data:`KEY_TARGET`.
    """
    setups = {c.name: c.setup for c in CONTENDERS if c.name in KEY_CONTENDERS}
    setups.update({name + NAMED: setups[name] for name in list(setups)})
    cases = [(row, keys) for row in KEY_ROWS if row in setups for keys in KEY_COUNTS]
    samples: dict[tuple[str, int], list[float]] = {case: [] for case in cases}

    async def run(row: str, keys: int, count: int) -> float:
        return await _keyed(setups[row], keys, count, named=row.endswith(NAMED))

    for row, keys in cases:  # warm-up: imports, caches, the allocator
        await run(row, keys, min(messages, 2000))
    for r in range(rounds):
        for row, keys in cases[r % len(cases) :] + cases[: r % len(cases)]:
            if progress is not None:
                progress(f"round {r + 1}: {row}, {keys} keys")
            samples[(row, keys)].append(await run(row, keys, messages))
    best: dict[str, dict[str, float]] = {}
    median: dict[str, dict[str, float]] = {}
    for (name, keys), values in samples.items():
        best.setdefault(name, {})[str(keys)] = min(values) * 1e6
        median.setdefault(name, {})[str(keys)] = statistics.median(values) * 1e6
    most = str(KEY_COUNTS[-1])
    one = str(KEY_COUNTS[0])
    ratios = []
    for name, costs in best.items():
        value = costs[most] / costs[one]
        what = "named keys" if name.endswith(NAMED) else "keys"
        ratios.append(
            {
                "name": f"{name}: {most} {what} / {one} key",
                "value": value,
                "target": f"<= {KEY_TARGET}",
                "met": value <= KEY_TARGET,
            }
        )
    return {
        "messages": messages,
        "rounds": rounds,
        "key_counts": list(KEY_COUNTS),
        "per_message_us": best,
        "per_message_median_us": median,
        "ratios": ratios,
    }


async def _dead_letter_run(messages: int, concurrency: int, directory: Path) -> float:
    """Seconds for a consumer to dead-letter ``messages`` into a fresh SQLite store."""
    from resilience.consumer import ResilientConsumer
    from resilience.dead_letter import SQLiteStore
    from resilience.errors import DeadLetter
    from resilience.events import Outcome
    from resilience.policy import Policy
    from resilience.testing import run_until_settled

    path = directory / f"dead-letters-{time.monotonic_ns()}.sqlite3"
    backend = MemoryBackend.isolated()
    for n in range(messages):
        await backend.publish_message("bench.dead", {"n": n})
    policy = Policy.from_dict({"dead_letter": {"path": str(path)}})
    consumer = ResilientConsumer(backend, policy=policy, concurrency=concurrency)

    async def reject(payload: dict[str, Any]) -> None:
        raise DeadLetter("rejected by the benchmark")

    started = time.perf_counter()
    outcomes = await run_until_settled(consumer, reject, messages)
    elapsed = time.perf_counter() - started
    written = len(await SQLiteStore(path).find())
    if outcomes.counts.get(Outcome.DEAD_LETTERED, 0) != messages or written != messages:
        raise RuntimeError(
            f"dead-lettered {outcomes.counts.get(Outcome.DEAD_LETTERED, 0)} and stored "
            f"{written} of {messages} messages"
        )
    if backend.size() or backend.unacked():
        raise RuntimeError("messages were left unacknowledged after their dead letters")
    return elapsed


def _envelopes(messages: int) -> list[dict[str, Any]]:
    from resilience.dead_letter import EnvelopeBuilder
    from resilience.delivery import Delivery

    builder = EnvelopeBuilder()
    return [
        builder.build(
            Delivery({"n": n}, key="bench.dead", message_id=str(n)),
            ValueError("rejected by the benchmark"),
            reason="rejected",
            stage="handle",
            monotonic_now=0.0,
        )
        for n in range(messages)
    ]


async def _store_only(messages: int, concurrency: int, directory: Path, *, each: bool) -> float:
    """Seconds to store ``messages`` ready envelopes: ``concurrency`` writers at once, or (with
    ``each``) one at a time, one transaction and one flush per envelope."""
    from resilience.dead_letter import SQLiteStore

    store = SQLiteStore(directory / f"store-{time.monotonic_ns()}.sqlite3")
    envelopes = _envelopes(messages)
    started = time.perf_counter()
    if each:
        for envelope in envelopes:
            await store.write(envelope)
    else:
        queue = iter(envelopes)

        async def writer() -> None:
            for envelope in queue:
                await store.write(envelope)

        await asyncio.gather(*(writer() for _ in range(concurrency)))
    return time.perf_counter() - started


async def measure_dead_letters(
    messages: int, rounds: int, concurrency: int = 64, progress: Progress | None = None
) -> dict[str, Any]:
    """Dead letters per second into SQLite through a consumer, and one commit per envelope.

    Returns:
        ``per_second`` for both (best round; medians beside), the commit-per-envelope figure
        as the reference, and the target ratio.
    """
    runs: dict[str, list[float]] = {
        "consumer, group commit": [],
        "store alone, group commit": [],
        "store alone, one commit per envelope": [],
    }
    reference = max(1, min(messages, 500))
    with tempfile.TemporaryDirectory(prefix="resilience-bench-dlq-") as tmp:
        directory = Path(tmp)
        await _dead_letter_run(min(messages, 200), concurrency, directory)  # warm-up
        for r in range(rounds):
            if progress is not None:
                progress(f"round {r + 1}: dead letters")
            elapsed = await _dead_letter_run(messages, concurrency, directory)
            runs["consumer, group commit"].append(messages / elapsed)
            elapsed = await _store_only(messages, concurrency, directory, each=False)
            runs["store alone, group commit"].append(messages / elapsed)
            elapsed = await _store_only(reference, 1, directory, each=True)
            runs["store alone, one commit per envelope"].append(reference / elapsed)
    best = {name: max(values) for name, values in runs.items()}
    rate = best["consumer, group commit"]
    return {
        "messages": messages,
        "reference_messages": reference,
        "rounds": rounds,
        "concurrency": concurrency,
        "per_second": best,
        "per_second_median": {name: statistics.median(v) for name, v in runs.items()},
        "ratios": [
            {
                "name": "dead letters per second (SQLite, synchronous=FULL)",
                "value": rate,
                "target": f">= {DEAD_LETTER_TARGET:,.0f}",
                "met": rate >= DEAD_LETTER_TARGET,
            }
        ],
    }


DEAD_LETTER_MESSAGES = 5000
"""Dead letters per round at most (a round of 100,000 would take a minute)."""


def measure_scaling(messages: int, rounds: int) -> dict[str, Any]:
    """Both parts, each in an event loop of its own; dead letters' log lines are captured.

    Returns:
        ``{"keys": ..., "dead_letters": ...}`` (see :func:`measure_keys` and
        :func:`measure_dead_letters`).

    Raises:
        RuntimeError: called from a running event loop, or a consumer lost a message.
    """
    keys = asyncio.run(measure_keys(messages, rounds))
    with structlog.testing.capture_logs():  # one "dead_lettered" line per message otherwise
        dead = asyncio.run(measure_dead_letters(min(messages, DEAD_LETTER_MESSAGES), rounds))
    return {"keys": keys, "dead_letters": dead}


def format_scaling(keys: dict[str, Any] | None, dead: dict[str, Any] | None) -> str:
    """The key and dead-letter tables for the terminal (either may be missing)."""
    parts: list[str] = []
    ratios: list[dict[str, Any]] = []
    if keys is not None:
        counts = [str(k) for k in keys["key_counts"]]
        rows = []
        for name, costs in keys["per_message_us"].items():
            medians = keys["per_message_median_us"][name]
            rows.append(
                [name, *(f"{costs[k]:.2f} ({medians[k]:.2f})" for k in counts)],
            )
        parts += [
            f"MemoryBackend: us/message, best (median) of {keys['rounds']} rounds of "
            f"{keys['messages']} messages (every key read; '{NAMED[2:]}': read by name)",
            format_table(("consumer", *(f"{k} keys" for k in counts)), rows),
            "",
        ]
        ratios += keys["ratios"]
    if dead is not None:
        rows = [
            [name, f"{rate:,.0f}", f"{dead['per_second_median'][name]:,.0f}"]
            for name, rate in dead["per_second"].items()
        ]
        parts += [
            f"Dead letters into SQLite: {dead['messages']} per run through a consumer with "
            f"concurrency {dead['concurrency']} ({dead['reference_messages']} for one commit "
            f"per envelope), best of {dead['rounds']}",
            format_table(("writer", "per second", "median"), rows),
            "",
        ]
        ratios += dead["ratios"]
    if ratios:
        parts.append(
            format_table(
                ("ratio", "value", "target", "met"),
                [
                    [r["name"], f"{r['value']:,.2f}", r["target"], "yes" if r["met"] else "NO"]
                    for r in ratios
                ],
            )
        )
    return "\n".join(parts)
