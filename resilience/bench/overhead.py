"""What the project costs per message on the success path, as ratios from one run.

Every consumer contender drains the same number of pre-published messages from a fresh
:class:`~abe.backends.message_queue.service.memory.MemoryBackend` with a handler that does
nothing, so the time per message is the consumer's and the wrappers' own cost, measured as CPU
time of the process (the contenders are CPU-bound; time spent waiting for a core on a busy
machine is not theirs). Contenders are measured in interleaved rounds (the order rotates each
round), so slow drift of the machine hits them all alike, and each contender's median round
counts (the best round is reported too). Garbage collection is paused while a contender is
timed, as ``timeit`` does.

Peers (tenacity, stamina, aiobreaker, purgatory, the OpenTelemetry SDK) are imported lazily;
a missing one gives a row marked "not available" instead of an error.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import tenacity

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.delivery import Delivery
from resilience.retry import Retry

from ._contenders import CONTENDERS, KEY, Unavailable, _Contender, full_pipeline_policy
from ._drain import _drain, gc_paused
from ._http_contender import HTTP_CONTENDERS, http_ratios
from .failures import format_failures, measure_failures
from .report import format_table, machine_info, quiet_policy_advice
from .scaling import format_scaling, measure_scaling

__all__ = ["format_overhead", "full_pipeline_policy", "measure_overhead"]

# -- the retry middleware against tenacity, without a consumer ----------------------------------


async def _per_call(call: Callable[[], Awaitable[None]], calls: int) -> float:
    with gc_paused():
        start = time.perf_counter()
        for _ in range(calls):
            await call()
        return (time.perf_counter() - start) / calls


async def _retry_rows(calls: int) -> dict[str, float]:
    delivery = Delivery({"n": 1})
    retry = Retry(attempts=3)

    async def terminal(d: Delivery) -> None:
        return None

    async def direct() -> None:
        await terminal(delivery)

    async def middleware() -> None:
        await retry(delivery, terminal)

    async def per_call_tenacity() -> None:
        async for attempt in tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(3),
            wait=tenacity.wait_exponential(multiplier=0.1, max=30),
            reraise=True,
        ):
            with attempt:
                await terminal(delivery)

    return {
        "direct call": await _per_call(direct, calls),
        "Retry middleware": await _per_call(middleware, calls),
        "tenacity AsyncRetrying": await _per_call(per_call_tenacity, calls),
    }


# -- the run ---------------------------------------------------------------------------------

Progress = Callable[[int, int, str, float], None]


async def _measure(messages: int, rounds: int, progress: Progress | None) -> dict[str, Any]:
    available: list[_Contender] = []
    missing: dict[str, str] = {}
    for contender in (*CONTENDERS, *HTTP_CONTENDERS):
        try:
            consumer, _ = contender.setup(MemoryBackend.isolated(keys=[KEY]))
        except Unavailable as exc:
            missing[contender.name] = str(exc)
            continue
        del consumer
        available.append(contender)
    samples: dict[str, list[float]] = {c.name: [] for c in available}
    micro: dict[str, list[float]] = {}
    total = rounds * (len(available) + 1)
    step = 0
    # One warm-up pass so imports, caches and the allocator are in their steady state.
    for contender in available:
        await _drain(contender.setup, min(messages, 2000))
    for r in range(rounds):
        order = available[r % len(available) :] + available[: r % len(available)]
        for contender in order:
            if progress is not None:
                progress(step, total, f"round {r + 1}: {contender.name}", 0.0)
            samples[contender.name].append(await _drain(contender.setup, messages))
            step += 1
        if progress is not None:
            progress(step, total, f"round {r + 1}: retry vs tenacity", 0.0)
        for name, value in (await _retry_rows(messages)).items():
            micro.setdefault(name, []).append(value)
        step += 1
    if progress is not None:
        progress(total, total, "done", 1.0)
    # Ratios use each contender's median round: on a shared machine single rounds can be off
    # either way (a busy neighbour, a quiet moment), and the rounds are interleaved.
    per_message = {name: statistics.median(values) for name, values in samples.items()}
    per_call = {name: statistics.median(values) for name, values in micro.items()}
    return {
        "benchmark": "overhead",
        "messages": messages,
        "rounds": rounds,
        "machine": machine_info(),
        "per_message_us": {k: v * 1e6 for k, v in per_message.items()},
        "per_message_best_us": {k: min(v) * 1e6 for k, v in samples.items()},
        "per_call_us": {k: v * 1e6 for k, v in per_call.items()},
        "descriptions": {c.name: c.description for c in CONTENDERS},
        "not_available": missing,
        "ratios": _ratios(per_message, per_call) + http_ratios(per_message),
    }


def _ratio(
    name: str,
    value: float | None,
    target: str,
    met: Callable[[float], bool] | None,
    how: str,
) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "target": target,
        "met": None if value is None or met is None else met(value),
        "how": how,
        "note": None,
    }


def _added(
    cost: float | None, base: float | None, reference: float | None, reference_base: float | None
) -> float | None:
    """What ``cost`` adds over ``base``, divided by what ``reference`` adds over
    ``reference_base`` (``None`` when a figure is missing or the reference adds nothing)."""
    if not (cost and base and reference and reference_base) or reference <= reference_base:
        return None
    return (cost - base) / (reference - reference_base)


_AT_MOST_TWICE_BARE = (
    "resilient, no middleware",
    "pipeline+total timeout",
    "pipeline+total timeout, concurrency 8",
    "pipeline+total timeout, concurrency 64",
    "Policy(), concurrency 8",
    "pipeline+listener",
    "pipeline+log context",
)
"""The rows that, besides the pipeline and Policy(), must cost at most twice the bare
consumer: what users run (a total timeout, workers, a listener, the log context)."""


def _ratios(per_message: dict[str, float], per_call: dict[str, float]) -> list[dict[str, Any]]:
    bare = per_message.get("bare")
    pipeline = per_message.get("pipeline")
    core = per_message.get("resilient, retry+timeout")
    nosdk = per_message.get("pipeline+telemetry (no SDK)")
    sdk = per_message.get("pipeline+telemetry (SDK)")
    traces = per_message.get("pipeline+telemetry (SDK, traces only)")
    span = per_message.get("bare+otel span")
    histogram = per_message.get("bare+otel span+histogram")
    direct = per_call["direct call"]
    retry_added = per_call["Retry middleware"] - direct
    tenacity_added = per_call["tenacity AsyncRetrying"] - direct
    share = _added(histogram, span, span, bare)
    rows = [
        _ratio(
            "pipeline / bare consumer",
            pipeline / bare if pipeline and bare else None,
            "<= 2.0",
            lambda v: v <= 2.0,
            "per-message cost of ResilientConsumer with the full default pipeline over the "
            "bare AsyncLoopConsumer",
        ),
        _ratio(
            "Policy() / bare consumer",
            core / bare if core and bare else None,
            "<= 2.0",
            lambda v: v <= 2.0,
            "per-message cost of ResilientConsumer with Policy() as is (retry and per-attempt "
            "timeout; telemetry auto adds nothing without an SDK) over the bare AsyncLoopConsumer",
        ),
        _ratio(
            "tenacity per call / Retry middleware",
            tenacity_added / retry_added if retry_added > 0 else None,
            ">= 20",
            lambda v: v >= 20,
            "added cost on success of a per-call AsyncRetrying over the Retry middleware "
            "(each minus a direct await)",
        ),
        _ratio(
            "telemetry without SDK",
            nosdk / pipeline - 1 if nosdk and pipeline else None,
            "< +10%",
            lambda v: v < 0.10,
            "extra per-message cost of the [telemetry] section when no SDK is configured",
        ),
        _ratio(
            "telemetry with SDK / bare span",
            _added(sdk, pipeline, span, bare),
            "<= 1.25",
            lambda v: v <= 1.25,
            "the project's instrumentation cost (SDK on, no-op exporter) over the cost of one "
            "bare SDK CONSUMER span with attributes",
        ),
        _ratio(
            "telemetry with SDK / bare span+histogram",
            _added(sdk, pipeline, histogram, bare),
            "<= 1.25",
            lambda v: v <= 1.25,
            "the project's instrumentation cost (spans and metrics, SDK on) over the same two "
            "signals written by hand: one bare SDK CONSUMER span plus one duration histogram "
            "record",
        ),
        _ratio(
            "histogram record / bare span",
            share,
            "(info)",
            None,
            "what one SDK histogram record (four attributes, inside the span) adds, over what "
            "the bare span costs",
        ),
        _ratio(
            "traces only / bare span",
            _added(traces, pipeline, span, bare),
            "<= 1.25",
            lambda v: v <= 1.25,
            "the project's span instrumentation alone (metrics off) over one bare SDK CONSUMER "
            "span with attributes; the 'telemetry with SDK' rows add the metrics",
        ),
    ]
    if share is not None and share > 0.25:
        rows[4]["note"] = (
            f"unreachable by any instrumentation that records a per-message duration "
            f"histogram: one SDK histogram record alone adds {share:.2f} of the span's cost "
            f"(row 'histogram record / bare span'); compare like for like below"
        )
    for name in _AT_MOST_TWICE_BARE:
        cost = per_message.get(name)
        rows.append(
            _ratio(
                f"{name} / bare consumer",
                cost / bare if cost and bare else None,
                "<= 2.0",
                lambda v: v <= 2.0,
                f"per-message cost of '{name}' over the bare (sequential) AsyncLoopConsumer",
            )
        )
    for workers in (8, 64):
        ours = per_message.get(f"pipeline+total timeout, concurrency {workers}")
        theirs = per_message.get(f"task per message, concurrency {workers}")
        rows.append(
            _ratio(
                f"pipeline, {workers} workers / task per message",
                ours / theirs if ours and theirs else None,
                "< 1.0",
                lambda v: v < 1.0,
                f"the full pipeline with a total timeout on {workers} workers over a "
                f"hand-written consumer running each message in a task of its own "
                f"(Semaphore({workers}) + create_task, no resilience at all)",
            )
        )
    for peer in ("bare+tenacity", "bare+stamina", "bare+aiobreaker", "bare+purgatory"):
        value = _added(per_message.get(peer), bare, pipeline, bare)
        if value is not None:
            name = peer.removeprefix("bare+")
            rows.append(
                _ratio(
                    f"{name} added / pipeline added",
                    value,
                    "(info)",
                    None,
                    f"what wrapping the handler with {name} adds to the bare consumer, over "
                    "what the whole pipeline adds",
                )
            )
    return rows


def measure_overhead(
    *,
    messages: int = 100_000,
    rounds: int = 5,
    progress: Progress | None = None,
    scaling: bool = True,
) -> dict[str, Any]:
    """Measure every contender; the result is a JSON-ready document.

    Args:
        messages: Messages per contender and round.
        rounds: Interleaved rounds; each contender's median round counts (best reported).
        progress: Called with (steps done, steps in all, label, fraction).
        scaling: Also measure the cost against the number of keys and the dead letters per
            second into SQLite (:mod:`resilience.bench.scaling`; under ``keys`` and
            ``dead_letters``), and the failure path against tenacity's own retry
            (:mod:`resilience.bench.failures`; under ``failures``).

    Returns:
        ``per_message_us`` (median round, CPU microseconds per message; the fastest is in
        ``per_message_best_us``), ``per_call_us`` (the retry
        micro-benchmark), ``ratios`` (each with its target and whether it was met), machine info
        and the contenders that were not available.

    Raises:
        RuntimeError: called from a running event loop (use a thread).
    """
    if messages < 2 or rounds < 1:
        raise ValueError("messages must be >= 2 and rounds >= 1")
    with quiet_policy_advice():
        report = asyncio.run(_measure(messages, rounds, progress))
        if scaling:
            report.update(measure_scaling(messages, rounds))
            report["failures"] = measure_failures(messages, rounds)
        return report


def format_overhead(report: dict[str, Any]) -> str:
    """The overhead report as terminal tables."""
    per_message: dict[str, float] = report["per_message_us"]
    bare = per_message.get("bare")
    rows = []
    for name, cost in per_message.items():
        rel = f"{cost / bare:.2f}x" if bare else "-"
        best = report["per_message_best_us"][name]
        rows.append([name, f"{cost:.2f}", f"{best:.2f}", rel])
    for name in report["not_available"]:
        rows.append([name, "-", "-", "n/a"])
    lines = [
        f"{report['messages']} messages per contender, {report['rounds']} interleaved rounds "
        f"(median of the rounds, CPU time; best round shown too); {report['machine']['cpu']}, "
        f"{report['machine']['nproc']} CPU, Python {report['machine']['python']}",
        "",
        format_table(("consumer", "us/msg", "best", "vs bare"), rows),
        "",
        format_table(
            ("success path, no consumer", "us/call"),
            [[k, f"{v:.3f}"] for k, v in report["per_call_us"].items()],
        ),
        "",
    ]
    ratio_rows = []
    notes = []
    for r in report["ratios"]:
        value = "-" if r["value"] is None else f"{r['value']:.2f}"
        if r["name"].startswith("telemetry without") and r["value"] is not None:
            value = f"{r['value']:+.1%}"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        if r.get("note"):
            notes.append(f"* {r['name']}: {r['note']}")
            met += " *"
        ratio_rows.append([r["name"], value, r["target"], met])
    lines.append(format_table(("ratio", "value", "target", "met"), ratio_rows))
    lines.extend(notes)
    lines.extend(_missing_note(report["not_available"]))
    if report.get("keys") or report.get("dead_letters"):
        lines += ["", format_scaling(report.get("keys"), report.get("dead_letters"))]
    if report.get("failures"):
        lines += ["", format_failures(report["failures"])]
    return "\n".join(lines)


def _missing_note(missing: dict[str, str]) -> list[str]:
    """One line naming the contenders not measured and what installs them."""
    if not missing:
        return []
    return [
        "",
        f"n/a: not measured, a library is missing ({', '.join(missing)}); the peer libraries "
        "come with pip install 'abe-resilience[dev]' (telemetry rows with the otel extra)",
    ]
