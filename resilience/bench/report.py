"""Output of the benchmarks: terminal tables, JSON documents, a PNG chart, a progress bar."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from .policies import NamedPolicy
from .scenarios import PartialOutage, Scenario, scenario_name
from .simulate import RunResult, Workload

__all__ = [
    "ProgressBar",
    "quiet_policy_advice",
    "comparison_document",
    "format_comparison",
    "format_seconds",
    "format_table",
    "machine_info",
    "write_chart",
]


@contextlib.contextmanager
def quiet_policy_advice() -> Iterator[None]:
    """Silence the policy's build-time advice while a success-path benchmark builds pipelines.

    The full default pipeline (``Policy()`` plus a default circuit breaker) logs, at every
    build, that its breaker opens only after retries are exhausted: true, and worth knowing
    when choosing a policy for outages (``resilience bench policies`` measures exactly that),
    but noise when dozens of pipelines are built to time the success path.
    """
    logger = logging.getLogger("resilience.policy")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def machine_info() -> dict[str, Any]:
    """CPU model, core count, Python and OS, for the reports."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "system": f"{platform.system()} {platform.release()}",
    }


def format_seconds(value: float | None) -> str:
    """A duration in the unit that reads best (``-`` for ``None``)."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 100:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}min"
    return f"{value / 3600:.1f}h"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-align the first column, right-align the others."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


_HEADERS = (
    "policy",
    "ok",
    "retried",
    "dlq",
    "lost",
    "pending",
    "calls",
    "ampl",
    "p50",
    "p95",
    "p99",
    "drain",
    "open",
)


def _row(r: RunResult) -> list[str]:
    return [
        r.policy,
        str(r.succeeded),
        str(r.retried),
        str(r.dead_lettered),
        f"{r.lost}!" if r.lost else "0",
        str(r.pending),
        str(r.calls),
        f"{r.amplification:.2f}x",
        format_seconds(r.latency_p50),
        format_seconds(r.latency_p95),
        format_seconds(r.latency_p99),
        format_seconds(r.drain_time),
        format_seconds(r.breaker_open),
    ]


def _params(scenario: Scenario) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in scenario.params().items()
    )


def format_comparison(
    results: Sequence[RunResult], scenarios: Sequence[Scenario], workload: Workload
) -> str:
    """One table per scenario, then a legend."""
    blocks = [
        f"{workload.messages} messages per run, Poisson arrivals at {workload.rate:g}/s, "
        f"concurrency {workload.concurrency}, seed {workload.seed} (times are simulated)"
    ]
    for scenario in scenarios:
        name = scenario_name(scenario)
        rows = [_row(r) for r in results if r.scenario == name]
        wall = sum(r.wall for r in results if r.scenario == name)
        blocks.append(
            f"\n{name}: {scenario.summary} ({_params(scenario)}); {wall:.1f}s wall for "
            f"{len(rows)} runs\n" + format_table(_HEADERS, rows)
        )
        if isinstance(scenario, PartialOutage):
            healthy = [
                [
                    r.policy,
                    format_seconds(r.healthy_p50),
                    format_seconds(r.healthy_p99),
                    str(r.flagged_calls),
                ]
                for r in results
                if r.scenario == name
            ]
            blocks.append(
                "healthy messages (90%) and calls to the failing dependency:\n"
                + format_table(("policy", "healthy p50", "healthy p99", "failing calls"), healthy)
            )
        if scenario.redelivery_timeout() is not None:
            redelivered = [
                [
                    r.policy,
                    str(r.redelivered),
                    str(r.calls),
                    f"{r.duplicates}!" if r.duplicates else "0",
                    str(r.duplicates_skipped),
                ]
                for r in results
                if r.scenario == name
            ]
            blocks.append(
                "redeliveries and duplicate handler completions:\n"
                + format_table(
                    ("policy", "redelivered", "handler runs", "duplicates", "acked as duplicate"),
                    redelivered,
                )
            )
    blocks.append(
        "\nok: succeeded (retried: after a retry) · dlq: records in the dead-letter stream · "
        "lost: neither succeeded, dead-lettered, dropped nor pending (acked and gone: a terminal "
        "failure without a dead-letter destination) · pending: unsettled at the horizon · "
        "calls: calls reaching the dependency · ampl: calls per message (no-retry = 1.00x) · "
        "p50/p95/p99: publish-to-settlement latency · drain: recovery until the pre-recovery "
        "backlog is settled · open: time the breaker spent open · redelivered: deliveries the "
        "broker handed out again · duplicates: handler completions beyond the first of their "
        "message · acked as duplicate: skipped by the idempotency layer"
    )
    return "\n".join(blocks)


def comparison_document(
    results: Sequence[RunResult],
    policies: Sequence[NamedPolicy],
    scenarios: Sequence[Scenario],
    workload: Workload,
) -> dict[str, Any]:
    """The JSON report: inputs, machine and one record per run."""
    return {
        "benchmark": "policies",
        "workload": {
            "messages": workload.messages,
            "rate": workload.rate,
            "concurrency": workload.concurrency,
            "seed": workload.seed,
            "horizon": workload.horizon,
        },
        "machine": machine_info(),
        "policies": [
            {
                "name": p.name,
                "description": p.description,
                "source": p.source,
                "policy": p.policy.to_dict(),
            }
            for p in policies
        ],
        "scenarios": [
            {"name": scenario_name(s), "summary": s.summary, "params": s.params()}
            for s in scenarios
        ],
        "results": [r.to_dict() for r in results],
    }


_CHARTS: tuple[tuple[str, Callable[[RunResult], float], bool], ...] = (
    ("succeeded (% of messages)", lambda r: 100.0 * r.succeeded / r.messages, False),
    (
        "dead-lettered (%); hatched: lost + pending",
        lambda r: 100.0 * r.dead_lettered / r.messages,
        False,
    ),
    ("load amplification (calls per message)", lambda r: r.amplification, False),
    ("p99 latency (simulated s, log)", lambda r: r.latency_p99 or 0.0, True),
    ("drain after recovery (simulated s)", lambda r: r.drain_time or 0.0, False),
    ("breaker open (simulated s)", lambda r: r.breaker_open or 0.0, False),
)


def write_chart(results: Sequence[RunResult], path: str | os.PathLike[str]) -> Path:
    """Draw grouped bar charts (one panel per metric, scenarios on x, one bar per policy).

    Returns:
        The PNG's path.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'abe-resilience[charts]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in results))
    policies = list(dict.fromkeys(r.policy for r in results))
    by_key = {(r.scenario, r.policy): r for r in results}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    width = 0.8 / max(1, len(policies))
    for ax, (title, metric, log) in zip(axes.flat, _CHARTS, strict=True):
        for i, policy in enumerate(policies):
            xs, ys, missing = [], [], []
            for j, scenario in enumerate(scenarios):
                result = by_key.get((scenario, policy))
                if result is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(metric(result))
                    missing.append(100.0 * (result.lost + result.pending) / result.messages)
            bars = ax.bar(xs, ys, width, label=policy)
            if title.startswith("dead-lettered") and any(missing):
                color = bars.patches[0].get_facecolor() if bars.patches else None
                ax.bar(xs, missing, width, bottom=ys, color=color, hatch="//", alpha=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(scenarios)), scenarios, rotation=20, fontsize=8)
        if log:
            ax.set_yscale("symlog", linthresh=0.1)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(policies), fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class ProgressBar:
    """A one-line progress bar on a terminal stream (silent when it is not a terminal).

    Args:
        stream: Where to draw (stderr by default).
        enabled: Force drawing on or off; by default only when ``stream`` is a TTY.
        width: Characters of the bar itself.
    """

    def __init__(
        self, stream: TextIO | None = None, *, enabled: bool | None = None, width: int = 30
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.width = width
        self._last = ""

    def __call__(self, done: int, total: int, label: str, fraction: float = 0.0) -> None:
        """Show ``done`` of ``total`` steps finished and the current one ``fraction`` done."""
        if not self.enabled:
            return
        overall = 1.0 if total <= 0 else min(1.0, (done + fraction) / total)
        filled = round(overall * self.width)
        text = (
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {overall:4.0%} "
            f"{min(done + 1, total)}/{total} {label}"
        )
        if text == self._last:
            return
        pad = max(0, len(self._last) - len(text))
        self._last = text
        self.stream.write(text + " " * pad)
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
