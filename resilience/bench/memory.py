"""Memory stays flat: resident memory over many messages through the full pipeline.

One :class:`~resilience.consumer.ResilientConsumer` with the full default pipeline consumes
``messages`` messages, published in batches (so the backend never holds more than one batch).
Resident memory is read from ``/proc/self/statm`` after a warm-up and after every tenth of the
run; the growth from the warm-up to the end is what a leak would show.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
from collections.abc import Callable
from typing import Any

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.consumer import ResilientConsumer

from ._contenders import full_pipeline_policy
from .report import format_table, machine_info, quiet_policy_advice

__all__ = ["format_memory", "measure_memory", "rss_bytes"]

KEY = "bench.memory"
TARGET_MB = 10.0

Progress = Callable[[int, int, str, float], None]


def rss_bytes() -> int | None:
    """Resident set size of this process, from ``/proc/self/statm`` (``None`` elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            resident_pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _peak_mb(final: int | None, samples: list[dict[str, float]]) -> float:
    """The highest resident memory seen: the kernel's high-water mark (``ru_maxrss``, KiB on
    Linux) is updated lazily, so it can lag behind the last ``statm`` reading."""
    seen = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    seen += [s["rss_mb"] for s in samples]
    if final is not None:
        seen.append(final / 2**20)
    return max(seen)


async def _run(messages: int, batch: int, progress: Progress | None) -> dict[str, Any]:
    backend = MemoryBackend.isolated(keys=[KEY])
    consumer = ResilientConsumer(backend, policy=full_pipeline_policy())
    handled = 0
    target = 0
    reached = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal handled
        handled += 1
        if handled >= target:
            reached.set()

    task = asyncio.create_task(consumer.run(handler))
    batches = -(-messages // batch)
    warmup = min(2, batches)
    checkpoints = {max(warmup, round(batches * i / 10)) for i in range(1, 11)}
    samples: list[dict[str, float]] = []
    baseline: int | None = None
    started = time.perf_counter()
    try:
        for b in range(1, batches + 1):
            size = min(batch, messages - (b - 1) * batch)
            target += size
            reached.clear()
            for n in range(size):
                await backend.publish_message(KEY, {"n": n, "batch": b})
            await reached.wait()
            if b == warmup:
                gc.collect()
                baseline = rss_bytes()
            if b in checkpoints:
                if progress is not None:
                    progress(b, batches, f"{handled} messages", 0.0)
                rss = rss_bytes()
                if rss is not None:
                    samples.append({"messages": handled, "rss_mb": rss / 2**20})
    finally:
        await consumer.shutdown()
        await asyncio.gather(task, return_exceptions=True)
    elapsed = time.perf_counter() - started
    gc.collect()
    final = rss_bytes()
    growth = None if baseline is None or final is None else (final - baseline) / 2**20
    if progress is not None:
        progress(batches, batches, "done", 1.0)
    return {
        "benchmark": "memory",
        "messages": handled,
        "batch": batch,
        "warmup_messages": min(messages, warmup * batch),
        "policy": full_pipeline_policy().to_dict(),
        "machine": machine_info(),
        "rss_after_warmup_mb": None if baseline is None else baseline / 2**20,
        "rss_final_mb": None if final is None else final / 2**20,
        "growth_mb": growth,
        "max_rss_mb": _peak_mb(final, samples),
        "target_mb": TARGET_MB,
        "met": None if growth is None else growth < TARGET_MB,
        "seconds": elapsed,
        "samples": samples,
    }


def measure_memory(
    *, messages: int = 1_000_000, batch: int = 10_000, progress: Progress | None = None
) -> dict[str, Any]:
    """Run ``messages`` messages through the full pipeline and report resident memory.

    Args:
        messages: Messages in all.
        batch: Messages published at a time (the backend holds at most this many).
        progress: Called with (batches done, batches in all, label, fraction).

    Returns:
        A JSON-ready document: ``growth_mb`` from after the warm-up to the end, the samples,
        and whether growth stayed under the 10 MB target (``None`` without ``/proc``).

    Raises:
        RuntimeError: called from a running event loop (use a thread).
    """
    if messages < 1 or batch < 1:
        raise ValueError("messages and batch must be >= 1")
    with quiet_policy_advice():
        return asyncio.run(_run(messages, batch, progress))


def format_memory(report: dict[str, Any]) -> str:
    """The memory report for the terminal."""

    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} MB"

    rows = [[f"{int(s['messages']):,}", f"{s['rss_mb']:.1f}"] for s in report["samples"]]
    met = {True: "yes", False: "NO", None: "unknown (no /proc)"}[report["met"]]
    growth = report["growth_mb"]
    return "\n".join(
        [
            f"{report['messages']:,} messages through the full pipeline in "
            f"{report['seconds']:.1f}s, batches of {report['batch']:,}",
            "",
            format_table(("messages", "RSS MB"), rows) if rows else "(no RSS samples)",
            "",
            f"RSS after warm-up ({report['warmup_messages']:,} messages): "
            f"{mb(report['rss_after_warmup_mb'])}; at the end: {mb(report['rss_final_mb'])}",
            f"growth: {'-' if growth is None else f'{growth:+.2f} MB'} "
            f"(target < {report['target_mb']:g} MB: {met}); peak RSS {mb(report['max_rss_mb'])}",
        ]
    )
