"""ResilientConsumer: settlement, base rules, concurrency, graceful drain."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abe.backends.message_queue.base import EventConsumer
from abe.backends.message_queue.consumer import AsyncLoopConsumer
from abe.backends.message_queue.service.memory import MemoryBackend, MemoryChannel
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.errors import ConfigError, DeadLetter, Drop
from resilience.events import MessageSettled, Outcome
from resilience.pipeline import Pipeline
from resilience.policy import Policy, resilient
from resilience.retry import Fixed, Retry
from resilience.testing import Outcomes, run_until_settled

FAST = Policy.from_dict({"retry": {"attempts": 3, "backoff": "fixed", "initial": 0, "maximum": 0}})


async def publish(backend: MemoryBackend, n: int, **extra: Any) -> None:
    for i in range(n):
        await backend.publish("jobs", {"i": i, **extra})


async def test_consumer_keeps_the_base_contract() -> None:
    """ResilientConsumer is an AsyncLoopConsumer and an EventConsumer with the same arguments."""
    backend = MemoryBackend.isolated()
    consumer = ResilientConsumer(backend, "workers")
    assert isinstance(consumer, AsyncLoopConsumer)
    assert isinstance(consumer, EventConsumer)
    assert consumer.backend is backend
    assert consumer.group == "workers"
    await consumer.shutdown()  # safe before run()
    await consumer.shutdown()


async def test_success_acks_every_delivery() -> None:
    """Successful messages are acknowledged: nothing is left queued or unacked."""
    backend = MemoryBackend.isolated()
    await publish(backend, 5)
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["i"])

    outcomes = await run_until_settled(ResilientConsumer(backend, policy=FAST), handler, 5)
    assert seen == [0, 1, 2, 3, 4]
    assert outcomes.counts == Counter({Outcome.SUCCESS: 5})
    assert backend.unacked() == []
    assert backend.size() == 0


async def test_group_is_forwarded_to_the_backend() -> None:
    """The consumer group reaches deliveries and the Delivery object."""
    backend = MemoryBackend.isolated()
    await publish(backend, 1)
    groups: list[str | None] = []

    async def capture(delivery: Any, call_next: Any) -> None:
        groups.append(delivery.group)
        await call_next(delivery)

    async def handler(payload: dict[str, Any]) -> None:
        return None

    await run_until_settled(ResilientConsumer(backend, "g1", policy=[capture]), handler, 1)
    assert groups == ["g1"]


async def test_terminal_failure_is_logged_acked_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure escaping the pipeline is logged with its traceback and the next message runs."""
    backend = MemoryBackend.isolated()
    await publish(backend, 3)

    async def handler(payload: dict[str, Any]) -> None:
        if payload["i"] == 1:
            raise DeadLetter("bad order")

    with caplog.at_level(logging.ERROR, logger="resilience.consumer"):
        outcomes = await run_until_settled(ResilientConsumer(backend, policy=FAST), handler, 3)
    assert outcomes.counts == Counter({Outcome.SUCCESS: 2, Outcome.FAILED: 1})
    failed = [e for e in outcomes.settled if e.outcome is Outcome.FAILED]
    assert failed[0].reason == "rejected"
    records = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert records
    assert records[0].exc_info is not None
    assert backend.unacked() == []


async def test_dropped_message_is_acked_without_error() -> None:
    """A handler raising Drop ends with outcome dropped and is acknowledged."""
    backend = MemoryBackend.isolated()
    await publish(backend, 1)

    async def handler(payload: dict[str, Any]) -> None:
        raise Drop("duplicate")

    outcomes = await run_until_settled(ResilientConsumer(backend, policy=FAST), handler, 1)
    assert outcomes.counts == Counter({Outcome.DROPPED: 1})
    assert backend.unacked() == []


async def test_retried_success_is_reported() -> None:
    """A message that succeeds on a retry settles as retried with its attempt count."""
    backend = MemoryBackend.isolated()
    await publish(backend, 1)
    calls = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("flaky")

    outcomes = await run_until_settled(ResilientConsumer(backend, policy=FAST), handler, 1)
    (event,) = outcomes.settled
    assert event.outcome is Outcome.RETRIED
    assert event.attempts == 3


class PlainBackend:
    """A backend with only the published protocol (no settlement)."""

    def __init__(self, payloads: list[dict[str, Any]]) -> None:
        self.payloads = payloads
        self.groups: list[str | None] = []

    async def publish(self, key: str, payload: dict[str, Any]) -> None:
        self.payloads.append(payload)

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        self.groups.append(group)
        for payload in self.payloads:
            yield payload

    @classmethod
    def from_env(cls) -> PlainBackend:
        return cls([])


async def test_plain_backend_is_consumed_at_most_once() -> None:
    """With a plain backend the consumer processes payloads and returns when it ends."""
    backend = PlainBackend([{"i": 0}, {"i": 1}])
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["i"])

    await ResilientConsumer(backend, "g", policy=FAST).run(handler)
    assert seen == [0, 1]
    assert backend.groups == ["g"]


async def test_cancelled_message_is_released_not_acked() -> None:
    """Cancelling run() mid-message releases the delivery; it comes back with count 2."""
    backend = MemoryBackend.isolated()
    await publish(backend, 1)
    started = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(3600)

    consumer = ResilientConsumer(backend, policy=FAST)
    outcomes = Outcomes()
    consumer.events.subscribe(outcomes)
    task = asyncio.create_task(consumer.run(handler))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcomes.counts == Counter({Outcome.CANCELLED: 1})
    assert backend.unacked() == []
    (again,) = backend.peek("jobs")
    assert again.delivery_count == 2


async def test_cancellation_during_backoff_is_released() -> None:
    """A message cancelled while waiting to retry is not retried, not acked, redelivered."""
    backend = MemoryBackend.isolated()
    await publish(backend, 1)
    calls = 0
    failed = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        failed.set()
        raise ConnectionError("down")

    policy = Pipeline(Retry(attempts=5, wait=Fixed(3600)))
    consumer = ResilientConsumer(backend, policy=policy, drain_timeout=0)
    task = asyncio.create_task(consumer.run(handler))
    await failed.wait()
    await asyncio.sleep(0)
    await consumer.shutdown()
    await asyncio.gather(task, return_exceptions=True)
    assert calls == 1
    assert backend.unacked() == []
    assert [m.delivery_count for m in backend.peek("jobs")] == [2]


async def test_graceful_drain_finishes_in_flight_and_stops_pulling() -> None:
    """shutdown() lets in-flight messages finish (acked) and pulls no new ones."""
    backend = MemoryBackend.isolated()
    await publish(backend, 10)
    release = asyncio.Event()
    started = 0
    all_started = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal started
        started += 1
        if started == 3:
            all_started.set()
        await release.wait()

    consumer = ResilientConsumer(backend, policy=FAST, concurrency=3)
    outcomes = Outcomes()
    consumer.events.subscribe(outcomes)
    task = asyncio.create_task(consumer.run(handler))
    await all_started.wait()
    stopper = asyncio.create_task(consumer.shutdown())
    await asyncio.sleep(0)
    release.set()
    await stopper
    await task  # a graceful stop returns normally
    assert outcomes.counts == Counter({Outcome.SUCCESS: 3})
    assert backend.size("jobs") == 7
    assert backend.unacked() == []
    assert consumer._task is None
    assert consumer._running is False


async def test_drain_timeout_cancels_and_releases_stuck_messages() -> None:
    """Past the drain timeout in-flight messages are cancelled and released, not acked."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    await publish(backend, 2)
    started = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()  # never finishes

    consumer = ResilientConsumer(backend, policy=FAST, concurrency=2, drain_timeout=5, clock=clock)
    outcomes = Outcomes()
    consumer.events.subscribe(outcomes)
    task = asyncio.create_task(consumer.run(handler))
    await started.wait()
    await asyncio.sleep(0)
    stopper = asyncio.create_task(consumer.shutdown())
    await asyncio.sleep(0)
    clock.advance(5)
    await stopper
    await asyncio.gather(task, return_exceptions=True)
    assert outcomes.counts == Counter({Outcome.CANCELLED: 2})
    assert backend.unacked() == []
    assert sorted(m.delivery_count for m in backend.peek("jobs")) == [2, 2]


async def test_inline_drain_waits_for_the_current_message() -> None:
    """With concurrency 1, shutdown lets the message in progress finish before stopping."""
    backend = MemoryBackend.isolated()
    await publish(backend, 3)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        entered.set()
        await release.wait()

    consumer = ResilientConsumer(backend, policy=FAST)
    outcomes = Outcomes()
    consumer.events.subscribe(outcomes)
    task = asyncio.create_task(consumer.run(handler))
    await entered.wait()
    stopper = asyncio.create_task(consumer.shutdown())
    await asyncio.sleep(0)
    release.set()
    await stopper
    await task
    assert outcomes.counts == Counter({Outcome.SUCCESS: 1})
    assert backend.size("jobs") == 2


async def test_second_run_while_running_returns_at_once() -> None:
    """A second run() call on a running consumer returns immediately."""
    backend = MemoryBackend.isolated()

    async def handler(payload: dict[str, Any]) -> None:
        return None

    consumer = ResilientConsumer(backend, policy=FAST)
    task = asyncio.create_task(consumer.run(handler))
    await asyncio.sleep(0)
    await asyncio.wait_for(consumer.run(handler), 1)
    await consumer.shutdown()
    await task


async def test_decorated_handler_brings_its_policy() -> None:
    """A @resilient handler given to the consumer runs under its own policy."""
    backend = MemoryBackend.isolated()
    await publish(backend, 1)
    calls = 0

    @resilient(retry={"attempts": 4, "backoff": "fixed", "initial": 0})
    async def handler(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    outcomes = await run_until_settled(ResilientConsumer(backend), handler, 1)
    assert calls == 4
    assert outcomes.settled[0].reason == "retries_exhausted"


async def test_policy_twice_is_an_error() -> None:
    """A decorated handler plus a consumer policy is refused instead of retrying twice."""
    backend = MemoryBackend.isolated()

    @resilient(retry={"attempts": 2})
    async def handler(payload: dict[str, Any]) -> None:
        return None

    with pytest.raises(ConfigError, match="one of them"):
        await ResilientConsumer(backend, policy=FAST).run(handler)


@pytest.mark.parametrize(
    "kwargs", [{"concurrency": 0}, {"concurrency": True}, {"drain_timeout": -1}]
)
def test_invalid_consumer_arguments(kwargs: dict[str, Any]) -> None:
    """Impossible consumer settings raise ConfigError."""
    with pytest.raises(ConfigError):
        ResilientConsumer(MemoryBackend.isolated(), **kwargs)


BEHAVIOURS = st.one_of(
    st.just(("ok", 0)),
    st.tuples(st.just("transient"), st.integers(1, 4)),
    st.just(("terminal", 0)),
    st.just(("drop", 0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(BEHAVIOURS, min_size=1, max_size=30), concurrency=st.integers(1, 6))
def test_every_message_ends_in_exactly_one_outcome(
    plan: list[tuple[str, int]], concurrency: int
) -> None:
    """Under a shared policy and any concurrency, each message settles exactly once, as expected."""

    async def scenario() -> tuple[list[MessageSettled], MemoryBackend]:
        backend = MemoryBackend.isolated()
        for i, _ in enumerate(plan):
            await backend.publish("jobs", {"i": i})
        calls: Counter[int] = Counter()

        async def handler(payload: dict[str, Any]) -> None:
            i = payload["i"]
            calls[i] += 1
            kind, failures = plan[i]
            await asyncio.sleep(0)
            if kind == "transient" and calls[i] <= failures:
                raise ConnectionError("flaky")
            if kind == "terminal":
                raise DeadLetter("no")
            if kind == "drop":
                raise Drop("dup")

        consumer = ResilientConsumer(backend, policy=FAST, concurrency=concurrency)
        outcomes = await run_until_settled(consumer, handler, len(plan))
        return outcomes.settled, backend

    settled, backend = asyncio.run(scenario())
    by_id = Counter(e.message_id for e in settled)
    assert len(settled) == len(plan)
    assert all(n == 1 for n in by_id.values())
    for event in settled:
        kind, failures = plan[int(event.message_id or 0) - 1]
        expected = {
            "ok": Outcome.SUCCESS,
            "terminal": Outcome.FAILED,
            "drop": Outcome.DROPPED,
            "transient": Outcome.RETRIED if failures < 3 else Outcome.FAILED,
        }[kind]
        assert event.outcome is expected
    assert backend.unacked() == []
    assert backend.size() == 0


async def test_cancelled_message_is_never_dead_lettered() -> None:
    """With a dead-letter store, a message cancelled during backoff is released, not stored."""
    from resilience.testing import MemoryStore

    backend = MemoryBackend.isolated()
    await publish(backend, 1)
    store = MemoryStore()
    failed = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        failed.set()
        raise ConnectionError("down")

    pipeline = Pipeline().dead_letter(store).retry(attempts=5, wait=Fixed(3600))
    consumer = ResilientConsumer(backend, policy=pipeline, drain_timeout=0)
    task = asyncio.create_task(consumer.run(handler))
    await failed.wait()
    await asyncio.sleep(0)
    await consumer.shutdown()
    await asyncio.gather(task, return_exceptions=True)
    assert store.envelopes == []
    assert backend.unacked() == []
    assert [m.delivery_count for m in backend.peek("jobs")] == [2]


class _SlowRelease(MemoryBackend):
    """A memory backend whose release takes several loop turns, counting finished releases."""

    def __init__(self) -> None:
        super().__init__(MemoryChannel())
        self.released = 0

    async def release(self, message: Any) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        await super().release(message)
        self.released += 1


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_run_returns_after_a_shutdown_whose_drain_timed_out(concurrency: int) -> None:
    """After a shutdown whose drain timeout expires, run() returns normally and every message
    that was in flight has been released (not acked) by then."""
    backend = _SlowRelease()
    for n in range(concurrency):
        await backend.publish("jobs", {"n": n})
    started: list[int] = []
    all_started = asyncio.Event()

    async def stuck(payload: dict[str, Any]) -> None:
        started.append(payload["n"])
        if len(started) == concurrency:
            all_started.set()
        await asyncio.Event().wait()

    consumer = ResilientConsumer(
        backend, policy=Policy.from_dict({"retry": False}), concurrency=concurrency, drain_timeout=0
    )
    outcomes = Outcomes()
    consumer.events.subscribe(outcomes)
    task = asyncio.create_task(consumer.run(stuck))
    async with asyncio.timeout(5):
        await all_started.wait()
    await consumer.shutdown()
    assert task.done()
    await task  # no CancelledError out of run()
    assert consumer.drain_timed_out
    assert backend.released == concurrency
    assert backend.unacked() == []
    assert outcomes.counts == Counter({Outcome.CANCELLED: concurrency})
    assert sorted(m.delivery_count for m in backend.peek("jobs")) == [2] * concurrency


async def test_a_clean_drain_is_not_reported_as_timed_out() -> None:
    """A shutdown whose in-flight message finishes in time acks it and says the drain was
    clean."""
    backend = MemoryBackend.isolated()
    await publish(backend, 1)
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        started.set()
        await release.wait()

    consumer = ResilientConsumer(backend, policy=FAST, drain_timeout=60)
    task = asyncio.create_task(consumer.run(handler))
    await started.wait()
    stopping = asyncio.create_task(consumer.shutdown())
    await asyncio.sleep(0)
    release.set()
    await stopping
    await task
    assert not consumer.drain_timed_out
    assert backend.unacked() == []
    assert backend.peek("jobs") == []


class _UserGate:
    """A gate of the user's own, without a ``flow`` flag: the consumer asks it every time."""

    name = "user-gate"

    def __init__(self) -> None:
        self.paused = False
        self.resumed = asyncio.Event()

    async def __call__(self, delivery: Any, call_next: Any) -> None:
        await call_next(delivery)

    async def wait_resumed(self) -> None:
        await self.resumed.wait()
        self.paused = False

    def holds(self, delivery: Any) -> bool:
        return False


async def test_a_gate_without_a_flow_flag_is_asked_before_every_message() -> None:
    """A user's gate pauses the consumer after the message that closed it, and pulling goes
    on once it resumes."""
    backend = MemoryBackend.isolated()
    await publish(backend, 3)
    gate = _UserGate()
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["i"])
        if payload["i"] == 0:
            gate.paused = True

    consumer = ResilientConsumer(backend, policy=Pipeline(gate))
    task = asyncio.create_task(consumer.run(handler))
    for _ in range(20):
        await asyncio.sleep(0)
    assert seen == [0]
    gate.resumed.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert seen == [0, 1, 2]
    await consumer.shutdown()
    await task


async def test_settlement_records_of_bare_payloads_use_the_delivery_defaults() -> None:
    """A backend without settlement hands out bare payloads: their records carry no id or key,
    one attempt, and the outcome."""

    class Plain:
        """Only ``consume()``: at-most-once, no message metadata."""

        def __init__(self, payloads: list[dict[str, Any]]) -> None:
            self.payloads = payloads

        async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
            for payload in self.payloads:
                yield payload

    async def handler(payload: dict[str, Any]) -> None:
        return None

    consumer = ResilientConsumer(Plain([{"i": 0}, {"i": 1}]), policy=FAST)  # type: ignore[arg-type]
    records: list[MessageSettled] = []
    consumer.events.subscribe(records.append)
    await consumer.run(handler)
    assert [(r.message_id, r.key, r.outcome, r.attempts) for r in records] == [
        (None, None, Outcome.SUCCESS, 1),
        (None, None, Outcome.SUCCESS, 1),
    ]


async def test_each_settle_path_reports_one_record_with_its_fields() -> None:
    """The fast path (success) and the slow ones (failed, dropped, cancelled) report through the
    same function: outcome, attempts, reason and error type as each path decided."""
    backend = MemoryBackend.isolated()
    for kind in ("ok", "bad", "drop", "hang"):
        await backend.publish("jobs", {"kind": kind})
    hanging = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        kind = payload["kind"]
        if kind == "bad":
            raise KeyError("missing")
        if kind == "drop":
            raise Drop("not for us")
        if kind == "hang":
            hanging.set()
            await asyncio.sleep(3600)

    consumer = ResilientConsumer(backend, policy=FAST)
    records: list[MessageSettled] = []
    consumer.events.subscribe(
        lambda event: records.append(event) if isinstance(event, MessageSettled) else None
    )
    task = asyncio.create_task(consumer.run(handler))
    await hanging.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    by_outcome = {record.outcome: record for record in records}
    assert [record.outcome for record in records] == [
        Outcome.SUCCESS,
        Outcome.FAILED,
        Outcome.DROPPED,
        Outcome.CANCELLED,
    ]
    assert all(record.key == "jobs" for record in records)
    assert all(record.duration >= 0 for record in records)
    ok = by_outcome[Outcome.SUCCESS]
    assert (ok.attempts, ok.reason, ok.error_type) == (1, None, None)
    failed = by_outcome[Outcome.FAILED]
    assert failed.error_type == "KeyError"
    assert failed.reason is not None
    assert by_outcome[Outcome.DROPPED].error_type == "Drop"
    cancelled = by_outcome[Outcome.CANCELLED]
    assert (cancelled.reason, cancelled.error_type) == (None, None)
