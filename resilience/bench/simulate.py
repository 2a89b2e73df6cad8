"""The policy-comparison engine: a ResilientConsumer against a simulated dependency.

Each run publishes a seeded Poisson stream of messages to an in-memory backend, consumes it with
a real :class:`~resilience.consumer.ResilientConsumer` built from the policy (at-least-once
settlement, the full pipeline), and lets the handler call a :class:`~.scenarios.Scenario`. The
whole run happens on a :class:`~._vloop.VirtualTimeLoop`: an hour of outage takes a fraction of
a second, and the same seed gives the same numbers on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.clock import LoopClock
from resilience.consumer import ResilientConsumer
from resilience.errors import ConfigError, RetryAfter
from resilience.events import EventBus, MessageSettled, Outcome
from resilience.testing import zero_waits

from ._broker import RedeliveringBackend
from ._vloop import run_virtual
from .policies import NamedPolicy
from .scenarios import RateLimitedError, Scenario, scenario_name

__all__ = ["RunResult", "Workload", "compare", "percentile", "simulate"]

WORK_KEY = "bench.work"
DLQ_KEY = WORK_KEY + ".dlq"

Progress = Callable[[float], None]
"""Called with the fraction of the run's messages settled so far (0..1)."""

_FINAL = {
    Outcome.SUCCESS,
    Outcome.RETRIED,
    Outcome.DEAD_LETTERED,
    Outcome.DROPPED,
    Outcome.FAILED,
}

_OPEN_STATES = ("open", "forced_open")


@dataclass(frozen=True, slots=True)
class Workload:
    """The traffic every policy faces.

    Args:
        messages: Messages published per run.
        rate: Mean arrival rate (messages per simulated second, Poisson arrivals).
        concurrency: The consumer's ``concurrency``.
        seed: Seeds arrivals, poison messages, the dependency's randomness and backoff jitter.
        horizon: Simulated seconds after the last arrival before a run gives up; messages
            not settled by then are reported as ``pending``.

    Raises:
        ConfigError: a value is out of range.
    """

    messages: int = 10_000
    rate: float = 2.0
    concurrency: int = 8
    seed: int = 1
    horizon: float = 6 * 3600.0

    def __post_init__(self) -> None:
        if isinstance(self.messages, bool) or not isinstance(self.messages, int):
            raise ConfigError(f"messages must be an integer, got {self.messages!r}")
        if self.messages < 1:
            raise ConfigError(f"messages must be >= 1, got {self.messages}")
        if not self.rate > 0 or math.isinf(self.rate):
            raise ConfigError(f"rate must be a positive number of messages/s, got {self.rate!r}")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise ConfigError(f"concurrency must be an integer, got {self.concurrency!r}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.horizon > 0:
            raise ConfigError(f"horizon must be > 0 seconds, got {self.horizon!r}")


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one policy did in one scenario. Times are simulated seconds.

    Attributes:
        policy: The policy's label.
        scenario: The scenario's name.
        messages: Messages published.
        succeeded: Accepted by the dependency (first attempt or after retries).
        retried: Of ``succeeded``, how many needed more than one attempt.
        dead_lettered: Records found in the dead-letter stream (``<key>.dlq``) at the end.
        dropped: Dropped on purpose (ignored failures, ``Drop``).
        lost: Neither succeeded, dead-lettered, dropped nor pending: acknowledged and gone
            (a terminal failure under a policy without a dead-letter destination). Counted
            from ground truth, not from what the consumer reports: a message counts as
            succeeded only if the dependency accepted it, as dead-lettered only if its record
            is in the dead-letter stream, as pending only if the backend still holds it; so a
            message the pipeline acknowledged silently, or reported as a success although the
            dependency failed it, shows here.
        pending: Not settled when the horizon ended: still queued or delivered and unacked.
        calls: Calls that reached the dependency.
        amplification: ``calls / messages``: load against the no-retry baseline (1.0).
        latency_p50: Median publish-to-settlement time of settled messages.
        latency_p95: 95th percentile of the same.
        latency_p99: 99th percentile of the same.
        healthy_p50: Median latency of the messages the scenario did not flag (its
            ``poison_rate``): in ``partial_outage``, those that never call the failing
            dependency.
        healthy_p99: 99th percentile of the same.
        flagged_calls: Calls made for flagged messages (in ``partial_outage``: calls to the
            failing dependency).
        drain_time: From the dependency's recovery until the last message published before it
            settled (``None``: the scenario has no recovery, or the backlog never drained).
        breaker_open: Time the circuit breaker spent open (``None``: no breaker).
        simulated: Simulated duration of the run.
        wall: Real seconds the run took (not part of the deterministic result).
        reasons: Terminal reasons (``retries_exhausted``, ``budget_exhausted``, ...) by count.
        duplicates: Handler completions beyond the first of their message: effects that
            happened twice (counted by the handler itself, per message).
        duplicates_skipped: Deliveries acknowledged without running the handler because the
            message was completed before (outcome ``duplicate``: the idempotency layer).
        redelivered: Deliveries the simulated broker handed out again (redelivery scenarios:
            expired visibility, lost acknowledgements, deliveries given back).
    """

    policy: str
    scenario: str
    messages: int
    succeeded: int
    retried: int
    dead_lettered: int
    dropped: int
    lost: int
    pending: int
    calls: int
    amplification: float
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    healthy_p50: float | None
    healthy_p99: float | None
    flagged_calls: int
    drain_time: float | None
    breaker_open: float | None
    simulated: float
    wall: float = field(compare=False)
    reasons: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    duplicates_skipped: int = 0
    redelivered: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (``None`` when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Stats:
    """Listens to the consumer's events and tallies the run."""

    def __init__(self, loop: asyncio.AbstractEventLoop, total: int, recovery: float | None):
        self.loop = loop
        self.total = total
        self.recovery = recovery
        self.published: dict[str | None, float] = {}
        self.outcomes: Counter[Outcome] = Counter()
        self.reasons: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.healthy_latencies: list[float] = []
        self.flagged: set[str | None] = set()
        self.settled = 0
        self.calls = 0
        self.flagged_calls = 0
        self.accepted: set[int] = set()
        self.completions: Counter[int] = Counter()
        self.skipped = 0
        self.dropped: list[str | None] = []
        self.last_backlog_settled: float | None = None
        self.done = asyncio.Event()
        self.progress: Progress | None = None
        self._step = max(1, total // 100)
        self.open_since: float | None = None
        self.open_total = 0.0

    def __call__(self, event: object) -> None:
        if isinstance(event, MessageSettled):
            self._settled(event)
            return
        state = getattr(getattr(event, "to_state", None), "value", None)
        if state is None:
            return  # not a breaker state change
        if state in _OPEN_STATES:
            if self.open_since is None:
                self.open_since = self.loop.time()
        elif self.open_since is not None:
            self.open_total += self.loop.time() - self.open_since
            self.open_since = None

    def _settled(self, event: MessageSettled) -> None:
        if event.outcome is Outcome.DUPLICATE:
            self.skipped += 1
            return
        if event.outcome not in _FINAL:
            return  # cancelled or unsettled: released, it comes back
        published = self.published.pop(event.message_id, None)
        if published is None:
            return
        now = self.loop.time()
        self.outcomes[event.outcome] += 1
        if event.outcome is Outcome.DROPPED:
            self.dropped.append(event.message_id)
        if event.reason and event.outcome is not Outcome.SUCCESS:
            self.reasons[event.reason] += 1
        self.latencies.append(now - published)
        if event.message_id not in self.flagged:
            self.healthy_latencies.append(now - published)
        if self.recovery is not None and published < self.recovery:
            self.last_backlog_settled = now
        self.settled += 1
        if self.progress is not None and self.settled % self._step == 0:
            self.progress(self.settled / self.total)
        if self.settled >= self.total:
            self.done.set()

    def breaker_open(self, end: float) -> float:
        if self.open_since is not None:
            return self.open_total + end - self.open_since
        return self.open_total


async def _run(
    named: NamedPolicy, scenario: Scenario, workload: Workload, progress: Progress | None
) -> RunResult:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    seed = workload.seed
    arrivals = random.Random(f"{seed}:arrivals")
    scenario.reset(random.Random(f"{seed}:dependency"))
    clock = LoopClock()
    redelivering = scenario.redelivery_timeout() is not None
    backend = (
        RedeliveringBackend(scenario, keys=[WORK_KEY])
        if redelivering
        else MemoryBackend.isolated(keys=[WORK_KEY])
    )
    bus = EventBus()
    stats = _Stats(loop, workload.messages, scenario.recovery_at)
    stats.progress = progress
    bus.subscribe(stats)
    consumer = ResilientConsumer(
        backend,
        policy=named.policy,
        concurrency=workload.concurrency,
        drain_timeout=0.0,
        clock=clock,
        events=bus,
    )
    reply = scenario.reply

    async def handler(payload: dict[str, Any]) -> None:
        stats.calls += 1
        if payload["poison"]:
            stats.flagged_calls += 1
        answer = reply(loop.time(), payload["poison"])
        if answer.latency > 0:
            await clock.sleep(answer.latency)
        error = answer.error
        if error is not None:
            if isinstance(error, RateLimitedError):
                raise RetryAfter(error.retry_after, "rate limited") from error
            raise error
        stats.accepted.add(payload["n"])
        stats.completions[payload["n"]] += 1

    run_task = asyncio.create_task(consumer.run(handler))
    numbers: dict[str | None, int] = {}
    for n in range(workload.messages):
        await asyncio.sleep(arrivals.expovariate(workload.rate))
        poison = arrivals.random() < scenario.poison_rate
        message_id = await backend.publish_message(WORK_KEY, {"n": n, "poison": poison})
        stats.published[message_id] = loop.time()
        if poison:
            stats.flagged.add(message_id)
        numbers[message_id] = n
        if run_task.done():
            break
    waiter = asyncio.create_task(stats.done.wait())
    deadline = loop.time() + workload.horizon
    await asyncio.wait({waiter, run_task}, timeout=workload.horizon, return_when="FIRST_COMPLETED")
    if isinstance(backend, RedeliveringBackend):
        # Settled is not the end here: lost acknowledgements and expired deliveries still
        # come back. Wait until the broker holds nothing of the run (a look every simulated
        # second; the channel's join() never returns, the dead letters stay queued in it).
        while not run_task.done() and backend.holds(WORK_KEY) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(1.0)
    end = loop.time()
    if run_task.done():
        waiter.cancel()
        run_task.result()  # the consumer crashed: raise what it raised
        raise RuntimeError("the consumer stopped before every message was settled")
    waiter.cancel()
    await consumer.shutdown()
    with contextlib.suppress(asyncio.CancelledError):
        await run_task
    _forget_breakers(clock)

    tally = _tally(backend, numbers, stats)
    latencies = sorted(stats.latencies)
    healthy = sorted(stats.healthy_latencies)
    drain: float | None = None
    recovery = scenario.recovery_at
    if recovery is not None and not stats.published:
        last = stats.last_backlog_settled
        drain = 0.0 if last is None else max(0.0, last - recovery)
    return RunResult(
        policy=named.name,
        scenario=scenario_name(scenario),
        messages=workload.messages,
        succeeded=len(tally.succeeded),
        retried=stats.outcomes[Outcome.RETRIED],
        dead_lettered=tally.dead_letter_records,
        dropped=len(tally.dropped),
        lost=workload.messages - len(tally.accounted),
        pending=len(tally.pending),
        calls=stats.calls,
        amplification=stats.calls / workload.messages,
        latency_p50=percentile(latencies, 0.50),
        latency_p95=percentile(latencies, 0.95),
        latency_p99=percentile(latencies, 0.99),
        healthy_p50=percentile(healthy, 0.50),
        healthy_p99=percentile(healthy, 0.99),
        flagged_calls=stats.flagged_calls,
        drain_time=drain,
        breaker_open=stats.breaker_open(end) if named.has_breaker else None,
        simulated=end,
        wall=time.perf_counter() - started,
        reasons=dict(sorted(stats.reasons.items())),
        duplicates=sum(count - 1 for count in stats.completions.values()),
        duplicates_skipped=stats.skipped,
        redelivered=backend.redelivered if isinstance(backend, RedeliveringBackend) else 0,
    )


@dataclass(slots=True)
class _Tally:
    """Where every message ended, by message number, each counted in its first column only."""

    succeeded: set[int]
    dead_lettered: set[int]
    dropped: set[int]
    pending: set[int]
    dead_letter_records: int

    @property
    def accounted(self) -> set[int]:
        return self.succeeded | self.dead_lettered | self.dropped | self.pending


def _tally(backend: MemoryBackend, numbers: dict[str | None, int], stats: _Stats) -> _Tally:
    """Count outcomes from ground truth: what the dependency accepted and what the backend
    holds, not what the consumer says it did (the consumer is what is being measured)."""
    succeeded = set(stats.accepted)
    records = backend.peek(DLQ_KEY)
    dead_lettered: set[int] = set()
    for record in records:
        source = record.payload.get("source")
        message_id = source.get("message_id") if isinstance(source, dict) else None
        n = numbers.get(message_id) if isinstance(message_id, str) else None
        if n is None:  # a record without a usable source id: fall back to the payload
            payload = record.payload.get("payload")
            n = payload.get("n") if isinstance(payload, dict) else None
        if isinstance(n, int):
            dead_lettered.add(n)
    dead_lettered -= succeeded
    waiting = (*backend.peek(WORK_KEY), *backend.unacked(), *backend.delayed())
    held = [m for m in waiting if m.key == WORK_KEY]
    pending = {numbers[m.message_id] for m in held if m.message_id in numbers}
    pending -= succeeded | dead_lettered
    dropped = {numbers[i] for i in stats.dropped if i in numbers}
    dropped -= succeeded | dead_lettered | pending
    return _Tally(succeeded, dead_lettered, dropped, pending, len(records))


def _forget_breakers(clock: LoopClock) -> None:
    """Drop the run's breakers from the shared registry (they would pile up run after run)."""
    try:
        from resilience.breaker import default_registry
    except ImportError:
        return
    for breaker in default_registry:
        if getattr(breaker, "clock", None) is clock:
            default_registry.remove(breaker.name, clock=clock)


@contextlib.contextmanager
def _isolated(seed: int, verbose: bool) -> Iterator[None]:
    """Seed the global random module (tenacity's jitter uses it), silence per-message logs,
    and turn testing mode's zero waits off; restore all of it afterwards."""
    state = random.getstate()
    loggers = [logging.getLogger("resilience"), logging.getLogger("abe")]
    levels = [logger.level for logger in loggers]
    random.seed(f"{seed}:backoff")
    if not verbose:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
    try:
        with zero_waits(False):
            yield
    finally:
        random.setstate(state)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def simulate(
    policy: NamedPolicy,
    scenario: Scenario,
    workload: Workload | None = None,
    *,
    progress: Progress | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run one policy against one scenario on virtual time.

    Args:
        policy: The policy to run.
        scenario: The simulated dependency (a fresh copy is used; ``scenario`` is not changed).
        workload: Messages, arrival rate, concurrency, seed (defaults: :class:`Workload`).
        progress: Called with the fraction of messages settled, every 1%.
        verbose: Keep the pipeline's per-message log lines (silenced by default).

    Returns:
        The run's numbers; identical for identical arguments (apart from ``wall``).

    Raises:
        RuntimeError: called from a running event loop (use a thread), or the consumer stopped.
        SimulationStalled: the run deadlocked.
    """
    workload = workload or Workload()
    scenario = dataclasses.replace(scenario)
    with _isolated(workload.seed, verbose):
        return run_virtual(_run(policy, scenario, workload, progress))


RunProgress = Callable[[int, int, str, float], None]
"""Called with (runs done, runs in all, "scenario / policy", fraction of that run done)."""


def compare(
    policies: Sequence[NamedPolicy],
    scenarios: Sequence[Scenario],
    workload: Workload | None = None,
    *,
    progress: RunProgress | None = None,
    verbose: bool = False,
) -> list[RunResult]:
    """Run every policy against every scenario (scenario-major order).

    Returns:
        One :class:`RunResult` per (scenario, policy) pair.
    """
    workload = workload or Workload()
    results: list[RunResult] = []
    total = len(policies) * len(scenarios)
    for scenario in scenarios:
        for policy in policies:
            label = f"{scenario_name(scenario)} / {policy.name}"
            run_progress = None
            if progress is not None:
                run_progress = functools.partial(progress, len(results), total, label)
                run_progress(0.0)
            results.append(
                simulate(policy, scenario, workload, progress=run_progress, verbose=verbose)
            )
    if progress is not None:
        progress(total, total, "done", 1.0)
    return results
