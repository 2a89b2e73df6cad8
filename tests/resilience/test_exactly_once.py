"""Fault injection through the consumer: every message ends exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.bench import builtin_policies
from resilience.breaker import default_registry
from resilience.consumer import ResilientConsumer
from resilience.errors import DeadLetter, Drop
from resilience.policy import Policy
from resilience.testing import zero_waits

POLICIES: dict[str, Policy] = {name: p.policy for name, p in builtin_policies().items()}
POLICIES["full-total-timeout"] = Policy.from_dict(
    {
        "retry": {"attempts": 3, "backoff": "fixed", "initial": 0.1, "maximum": 0.1},
        "timeout": {"attempt": 30, "total": 60},
        "circuit_breaker": {"name": "exactly-once", "failure_threshold": 10_000},
        "dead_letter": {"destination": "backend"},
        "telemetry": {"enabled": False, "log_context": True},
    }
)

BEHAVIOURS = st.one_of(
    st.just(("ok", 0)),
    st.tuples(st.just("transient"), st.integers(1, 4)),
    st.just(("terminal", 0)),
    st.just(("drop", 0)),
)


# Every failure kind, and the shutdown cancelling a message in the middle of them: run for each
# policy at each concurrency besides the random plans.
EVERY_KIND: list[tuple[str, int]] = [
    ("ok", 0),
    ("transient", 1),
    ("terminal", 0),
    ("transient", 4),
    ("drop", 0),
    ("ok", 0),
    ("transient", 2),
    ("terminal", 0),
    ("ok", 0),
    ("transient", 3),
    ("drop", 0),
    ("ok", 0),
]


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("concurrency", [1, 8, 64])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(BEHAVIOURS, min_size=1, max_size=40),
    stop_at=st.none() | st.integers(0, 39),
)
@example(plan=EVERY_KIND, stop_at=None)
@example(plan=EVERY_KIND, stop_at=6)
def test_every_message_ends_exactly_once(
    concurrency: int, name: str, plan: list[tuple[str, int]], stop_at: int | None
) -> None:
    """Through every built-in policy, under random failures and a shutdown that cancels a
    message mid-handler, each message ends exactly once: handled, dropped, dead-lettered, or
    back in the queue (released or never pulled); nothing is lost or left unacknowledged."""
    if stop_at is not None and stop_at >= len(plan):
        stop_at = None

    async def scenario() -> None:
        default_registry.clear()  # each example starts with closed breakers
        backend = MemoryBackend.isolated(keys=["jobs"])
        for i in range(len(plan)):
            await backend.publish("jobs", {"i": i})
        calls: Counter[int] = Counter()
        handled: list[int] = []
        dropped: list[int] = []
        reached = asyncio.Event()

        async def handler(payload: dict[str, Any]) -> None:
            i = payload["i"]
            calls[i] += 1
            kind, failures = plan[i]
            if i == stop_at:
                reached.set()
                await asyncio.Event().wait()  # until the shutdown cancels it
            if kind == "transient" and calls[i] <= failures:
                raise ConnectionError("flaky")
            if kind == "terminal":
                raise DeadLetter("no")
            if kind == "drop":
                dropped.append(i)
                raise Drop("duplicate")
            handled.append(i)

        consumer = ResilientConsumer(
            backend, policy=POLICIES[name], concurrency=concurrency, drain_timeout=0
        )
        task = asyncio.create_task(consumer.run(handler))
        for _ in range(2_000):
            if reached.is_set() or (backend.size() == 0 and not backend.unacked()):
                break
            await asyncio.sleep(0)
        await consumer.shutdown()
        await task  # returns normally after the shutdown

        dead = [m.payload["payload"]["i"] for m in backend.peek("jobs.dlq")]
        queued = [m.payload["i"] for m in backend.peek("jobs")]
        assert backend.unacked() == []
        ends = Counter(handled) + Counter(dropped) + Counter(dead) + Counter(queued)
        assert ends == Counter(range(len(plan)))  # each message ends exactly once
        for i in handled:
            assert plan[i][0] in ("ok", "transient")
        for i in dead:
            assert plan[i][0] in ("terminal", "transient")
        if stop_at is not None:
            assert stop_at in queued  # cancelled mid-handler: released, never acked
        if reached.is_set():
            assert consumer.drain_timed_out  # the shutdown cancelled it in the handler
        if plan is EVERY_KIND and stop_at is not None:
            assert reached.is_set()  # the explicit example does shut down mid-handler

    with zero_waits():
        asyncio.run(scenario())
