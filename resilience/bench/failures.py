"""The failure path: what a retried message costs, next to tenacity's own retry.

Part of ``resilience bench overhead``. Every message fails once (with zero waits) and then
succeeds, for 0%, 10% and 100% of the traffic:

* **Consumers.** The same pre-published messages drained as in the overhead table (CPU time of
  the process, garbage collection paused): ``bare+tenacity`` (the published consumer, each
  message run through a plain ``tenacity.AsyncRetrying`` loop, three attempts, no wait), the
  ``Retry`` layer alone in a ``ResilientConsumer``, and ``Policy()`` (retry and per-attempt
  timeout), all with zero waits.
* **Without a consumer.** The ``Retry`` middleware called directly against the same
  ``AsyncRetrying`` loop, so nothing but the two retry mechanisms differs.

The cost of one retry is the 100% row minus the 0% row of the same contender (the handler's own
raise is in both). Contenders run in interleaved rounds (the order rotates); medians count.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import tenacity

from abe.backends.message_queue.consumer import AsyncLoopConsumer
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.consumer import ResilientConsumer
from resilience.delivery import Delivery
from resilience.pipeline import Pipeline
from resilience.policy import Policy
from resilience.retry import Fixed, Retry

from ._contenders import Consumer, Handler, Wrap
from ._drain import _drain, gc_paused
from .report import format_table

__all__ = ["FAIL_SHARES", "PER_RETRY_TARGET", "format_failures", "measure_failures"]

FAIL_SHARES = (0, 10, 100)
"""Percent of the messages whose first attempt fails."""
PER_RETRY_TARGET = 1.0
"""The project's cost per retry over tenacity's, at most."""
FAILURE_MESSAGES = 20_000
"""Messages per contender and round at most (a retry costs tens of microseconds)."""

_ZERO_WAIT = {"retry": {"backoff": "fixed", "initial": 0}}

_now = time.process_time


class FailOnce(Exception):
    """What the benchmark's handler raises on a message's first attempt."""


def _failing(share: int, inner: Handler) -> Handler:
    """``inner``, failing the first attempt of ``share`` percent of the messages."""
    failed: set[int] = set()

    async def handler(payload: dict[str, Any]) -> None:
        n = payload["n"]
        if n % 100 < share and n not in failed:
            failed.add(n)
            raise FailOnce(n)
        await inner(payload)

    return handler


def _tenacity_loop(inner: Handler) -> Handler:
    async def handler(payload: dict[str, Any]) -> None:
        async for attempt in tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none(), reraise=True
        ):
            with attempt:
                await inner(payload)

    return handler


def _tenacity(backend: MemoryBackend) -> tuple[Consumer, Callable[[Handler], Handler]]:
    return AsyncLoopConsumer(backend), _tenacity_loop


def _retry_alone(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    policy = Pipeline(Retry(attempts=3, wait=Fixed(0)))
    return ResilientConsumer(backend, policy=policy), _same


def _policy(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return ResilientConsumer(backend, policy=Policy.from_dict(_ZERO_WAIT)), _same


def _same(handler: Handler) -> Handler:
    return handler


_CONSUMERS: dict[str, Callable[[MemoryBackend], tuple[Consumer, Wrap]]] = {
    "bare+tenacity": _tenacity,
    "Retry alone": _retry_alone,
    "Policy()": _policy,
}
"""The reference first, then the project's contenders (zero waits, three attempts each)."""


def _with_failures(
    setup: Callable[[MemoryBackend], tuple[Consumer, Wrap]], share: int
) -> Callable[[MemoryBackend], tuple[Consumer, Wrap]]:
    def failing_setup(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
        consumer, wrap = setup(backend)
        return consumer, lambda inner: wrap(_failing(share, inner))

    return failing_setup


async def _direct(share: int, calls: int, tenacity_loop: bool) -> float:
    """Seconds per message for the ``Retry`` middleware (or the tenacity loop) alone."""
    retry = Retry(attempts=3, wait=Fixed(0))
    handler = _failing(share, _noop)
    looped = _tenacity_loop(handler)
    payloads = [{"n": n} for n in range(calls)]

    async def terminal(d: Delivery) -> None:
        await handler(d.payload)

    with gc_paused():
        start = _now()
        if tenacity_loop:
            for payload in payloads:
                await looped(payload)
        else:
            for payload in payloads:
                await retry(Delivery(payload), terminal)
        return (_now() - start) / calls


async def _noop(payload: dict[str, Any]) -> None:
    return None


async def _measure(messages: int, rounds: int) -> dict[str, Any]:
    cases = [(name, share) for name in _CONSUMERS for share in FAIL_SHARES]
    direct = [
        (name, share) for name in ("tenacity AsyncRetrying", "Retry") for share in FAIL_SHARES
    ]
    samples: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    calls: dict[tuple[str, int], list[float]] = {c: [] for c in direct}
    for name, share in cases:  # warm-up
        await _drain(_with_failures(_CONSUMERS[name], share), min(messages, 2000))
    for r in range(rounds):
        for name, share in cases[r % len(cases) :] + cases[: r % len(cases)]:
            setup = _with_failures(_CONSUMERS[name], share)
            samples[(name, share)].append(await _drain(setup, messages))
        for name, share in direct[r % len(direct) :] + direct[: r % len(direct)]:
            calls[(name, share)].append(await _direct(share, messages, name != "Retry"))
    per_message = {
        name: {str(s): statistics.median(samples[(name, s)]) * 1e6 for s in FAIL_SHARES}
        for name in _CONSUMERS
    }
    per_call = {
        name: {str(s): statistics.median(calls[(name, s)]) * 1e6 for s in FAIL_SHARES}
        for name in ("tenacity AsyncRetrying", "Retry")
    }
    per_retry = {
        name: costs["100"] - costs["0"] for name, costs in (*per_message.items(), *per_call.items())
    }
    ratios = []
    for name, reference in (
        ("Retry alone", "bare+tenacity"),
        ("Policy()", "bare+tenacity"),
        ("Retry", "tenacity AsyncRetrying"),
    ):
        theirs = per_retry[reference]
        value = per_retry[name] / theirs if theirs > 0 else None
        target = name in ("Retry alone", "Retry")
        label = f"{name} (no consumer)" if name == "Retry" else name
        ratios.append(
            {
                "name": f"per retry: {label} / tenacity",
                "value": value,
                "target": f"<= {PER_RETRY_TARGET}" if target else "(info)",
                "met": None if value is None or not target else value <= PER_RETRY_TARGET,
            }
        )
    return {
        "messages": messages,
        "rounds": rounds,
        "fail_shares": list(FAIL_SHARES),
        "per_message_us": per_message,
        "per_call_us": per_call,
        "per_retry_us": per_retry,
        "ratios": ratios,
    }


def measure_failures(messages: int, rounds: int) -> dict[str, Any]:
    """Per-message cost at 0%, 10% and 100% fail-once traffic, and the cost of one retry.

    Args:
        messages: Messages per contender and round (at most :data:`FAILURE_MESSAGES`).
        rounds: Interleaved rounds; medians count.

    Returns:
        ``per_message_us[contender][share]`` (consumers), ``per_call_us[name][share]`` (the
        ``Retry`` middleware and the tenacity loop without a consumer), ``per_retry_us`` (100%
        minus 0%, per contender) and the ratios against tenacity's own retry.

    Raises:
        RuntimeError: called from a running event loop, or a consumer lost a message.
    """
    return asyncio.run(_measure(max(2, min(messages, FAILURE_MESSAGES)), rounds))


def format_failures(report: dict[str, Any]) -> str:
    """The failure-path table for the terminal."""
    shares = [str(s) for s in report["fail_shares"]]
    rows = []
    for group in ("per_message_us", "per_call_us"):
        for name, costs in report[group].items():
            label = name if group == "per_message_us" else f"{name} (no consumer)"
            rows.append(
                [label, *(f"{costs[s]:.2f}" for s in shares), f"{report['per_retry_us'][name]:.2f}"]
            )
    ratio_rows = [
        [
            r["name"],
            "-" if r["value"] is None else f"{r['value']:.2f}",
            r["target"],
            {True: "yes", False: "NO", None: ""}[r["met"]],
        ]
        for r in report["ratios"]
    ]
    return "\n".join(
        [
            f"Failure path: every listed share of messages fails once, zero waits; CPU us/message,"
            f" median of {report['rounds']} rounds of {report['messages']} messages; per retry ="
            " 100% minus 0%",
            format_table(("contender", *(f"{s}% fail" for s in shares), "per retry"), rows),
            "",
            format_table(("ratio", "value", "target", "met"), ratio_rows),
        ]
    )
