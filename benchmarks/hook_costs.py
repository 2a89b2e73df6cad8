"""One layer's success-path hooks, or one delivery object, repeated: for instruction counts.

Runs CASE N times inside an asyncio task; the instructions of one repetition are the difference
between two ``valgrind --tool=callgrind`` runs (N = 20,000 and N = 0) divided by 20,000::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/hook_costs.py timeout 20000

Cases: ``loop`` (the loop alone), ``timeout`` (a total timeout's ``enter`` and ``leave``),
``breaker`` (a closed breaker's ``enter`` and ``leave``), ``delivery`` (``new_delivery`` and
nine reads of the success path) and ``delivery_dict`` (the same with a class that has no slots
and class-level defaults for the fields that start as ``None``).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from abe.backends.message_queue.base.extensions import InboundMessage
from resilience.breaker import BreakerRegistry, CircuitBreaker
from resilience.clock import default_clock
from resilience.delivery import new_delivery
from resilience.events import EventBus
from resilience.timeout import Timeout

_new = object.__new__


class _DictDelivery:
    """A delivery without slots: the fields that start as ``None`` are class-level defaults."""

    deadline = None
    outcome = None
    reason = None
    failures = None
    extras = None


def _dict_delivery(message: InboundMessage, now: float, events: EventBus, task: Any) -> Any:
    d = _new(_DictDelivery)
    d.payload = message.payload
    d.message = message
    d.attempt = 1
    d.started_at = now
    d.events = events
    d.task = task
    d.now = now
    d.clock = default_clock
    return d


def _read(d: Any) -> None:
    """The reads a delivery gets on the success path (timeouts, retry, settlement)."""
    d.deadline, d.deadline, d.outcome, d.now, d.clock, d.task, d.attempt, d.payload, d.message  # noqa: B018


async def _main(case: str, n: int) -> None:
    task = asyncio.current_task()
    message = InboundMessage({}, "k", "id1", 1, {})
    events = EventBus()
    timeout = Timeout(60, total=True)
    breaker = CircuitBreaker("hook-costs", registry=BreakerRegistry())
    d = new_delivery(message, 1.0, events, task, default_clock)
    if case == "loop":
        for _ in range(n):
            d.deadline = None
    elif case == "timeout":
        for _ in range(n):
            d.deadline = None
            timeout.leave(timeout.enter(d), d)
    elif case == "breaker":
        for _ in range(n):
            d.deadline = None
            breaker.leave(breaker.enter(d), d)
    elif case == "delivery":
        for _ in range(n):
            _read(new_delivery(message, 1.0, events, task, default_clock))
    elif case == "delivery_dict":
        for _ in range(n):
            _read(_dict_delivery(message, 1.0, events, task))
    else:
        raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2])))
