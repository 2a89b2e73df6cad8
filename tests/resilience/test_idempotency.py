"""Idempotency layer: duplicates skipped, claims waited for or given back, failures released."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.backoff import Fixed
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import MemoryStore as DeadLetterMemoryStore
from resilience.delivery import Delivery
from resilience.errors import ConfigError, DeadLetterWriteError, Unsettled
from resilience.events import Outcome
from resilience.idempotency import (
    ClaimLost,
    ClaimState,
    Idempotency,
    InProgressElsewhere,
    MemoryStore,
    SQLiteStore,
    StoreUnavailable,
    current_transaction,
)
from resilience.pipeline import CallNext, Pipeline
from resilience.policy import Policy
from resilience.testing import run_until_settled


def delivery(message_id: str = "1-0", headers: dict[str, str] | None = None) -> Delivery:
    return Delivery({"n": 1}, key="orders", message_id=message_id, headers=headers)


class Counting:
    """A handler counting its runs, optionally failing the first ``fail`` times."""

    def __init__(self, fail: int = 0) -> None:
        self.runs = 0
        self.fail = fail

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.runs += 1
        if self.runs <= self.fail:
            raise ConnectionError("down")


async def test_second_delivery_of_a_completed_message_is_a_duplicate() -> None:
    """A redelivery of a completed message skips the handler and is marked duplicate."""
    clock = FakeClock()
    handler = Counting()
    call = Pipeline(Idempotency(MemoryStore(clock=clock), clock=clock)).build(handler)
    first, second = delivery(), delivery()
    await call(first)
    await call(second)
    assert handler.runs == 1
    assert first.outcome is None
    assert second.outcome is Outcome.DUPLICATE


async def test_completion_record_expires_after_its_ttl() -> None:
    """After the TTL a redelivery runs the handler again."""
    clock = FakeClock()
    handler = Counting()
    call = Pipeline(Idempotency(MemoryStore(clock=clock), ttl=10, clock=clock)).build(handler)
    await call(delivery())
    clock.advance(9.9)
    await call(delivery())
    assert handler.runs == 1
    clock.advance(0.2)
    await call(delivery())
    assert handler.runs == 2


async def test_failure_releases_the_claim_so_a_retry_runs() -> None:
    """A failing handler releases its claim: the next delivery runs it, not a duplicate."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    handler = Counting(fail=1)
    call = Pipeline(Idempotency(store, clock=clock)).build(handler)
    with pytest.raises(ConnectionError):
        await call(delivery())
    assert store.records == {}
    again = delivery()
    await call(again)
    assert handler.runs == 2
    assert again.outcome is None
    assert store.completed("orders/1-0")


async def test_cancellation_releases_the_claim() -> None:
    """A cancelled handler (shutdown) releases its claim and is not recorded as completed."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    started = asyncio.Event()

    async def slow(payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    call = Pipeline(Idempotency(store, clock=clock)).build(slow)
    task = asyncio.ensure_future(call(delivery()))
    await started.wait()
    assert list(store.records) == ["orders/1-0"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.records == {}


async def test_identity_from_header_survives_republish() -> None:
    """With header = idempotency-key, a re-published message (new broker id) is a duplicate."""
    clock = FakeClock()
    handler = Counting()
    layer = Idempotency(MemoryStore(clock=clock), header="idempotency-key", clock=clock)
    call = Pipeline(layer).build(handler)
    await call(delivery("1-0", {"idempotency-key": "order-7"}))
    republished = delivery("9-0", {"idempotency-key": "order-7"})
    await call(republished)
    other = delivery("9-1", {"idempotency-key": "order-8"})
    await call(other)
    assert handler.runs == 2
    assert republished.outcome is Outcome.DUPLICATE
    assert other.outcome is None


async def test_key_function_and_namespace_form_the_identity() -> None:
    """A key function gives the identity; the namespace prefixes it in the store."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    layer = Idempotency(store, key=lambda d: str(d.payload["n"]), namespace="billing:", clock=clock)
    await Pipeline(layer).build(Counting())(delivery())
    assert list(store.records) == ["billing:1"]


async def test_message_without_identity_runs_without_the_layer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No header and no id: the handler runs each time and a warning says so once."""
    clock = FakeClock()
    handler = Counting()
    layer = Idempotency(MemoryStore(clock=clock), header="idempotency-key", clock=clock)
    call = Pipeline(layer).build(handler)
    await call(delivery())
    await call(delivery())
    assert handler.runs == 2
    assert sum("has no identity" in r.getMessage() for r in caplog.records) == 1


async def test_duplicate_in_progress_waits_for_the_other_consumer() -> None:
    """A duplicate of a message being processed elsewhere waits, then is a duplicate."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    assert await store.claim("orders/1-0", "other", 60) is ClaimState.CLAIMED

    async def finish_elsewhere() -> None:
        while clock.monotonic() < 1.0:
            await asyncio.sleep(0)
        async with store.complete("orders/1-0", "other", 100, delivery()):
            pass

    handler = Counting()
    layer = Idempotency(store, wait=5, poll=0.25, clock=clock)
    other = asyncio.create_task(finish_elsewhere())
    waiting = delivery()
    await Pipeline(layer).build(handler)(waiting)
    await other
    assert handler.runs == 0
    assert waiting.outcome is Outcome.DUPLICATE
    assert clock.sleeps == [0.25, 0.25, 0.25, 0.25]


async def test_duplicate_in_progress_is_given_back_after_the_wait() -> None:
    """When the other consumer holds the claim longer than ``wait``, the delivery is given
    back unsettled (never run concurrently)."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.claim("orders/1-0", "other", 60)
    handler = Counting()
    layer = Idempotency(store, wait=1, poll=0.4, clock=clock)
    with pytest.raises(InProgressElsewhere) as caught:
        await Pipeline(layer).build(handler)(delivery())
    assert isinstance(caught.value, Unsettled)
    assert handler.runs == 0
    assert clock.sleeps == pytest.approx([0.4, 0.4, 0.2])
    assert store.records["orders/1-0"][0] == "other"


async def test_expired_lease_lets_another_consumer_take_over() -> None:
    """A claim whose lease ended (its consumer died) is taken over by the next delivery."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.claim("orders/1-0", "dead", 30)
    clock.advance(30)
    handler = Counting()
    await Pipeline(Idempotency(store, clock=clock)).build(handler)(delivery())
    assert handler.runs == 1
    assert store.completed("orders/1-0")


async def test_claim_lost_while_running_is_not_recorded() -> None:
    """If the lease ran out and another consumer claimed it, completion raises ClaimLost."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)

    async def overrun(payload: dict[str, Any]) -> None:
        clock.advance(61)
        assert await store.claim("orders/1-0", "thief", 60) is ClaimState.CLAIMED

    with pytest.raises(ClaimLost):
        await Pipeline(Idempotency(store, lease=60, clock=clock)).build(overrun)(delivery())
    assert store.records["orders/1-0"][0] == "thief"


async def test_consumer_acks_a_duplicate_and_reports_it() -> None:
    """Through the consumer, a duplicate is acknowledged with outcome duplicate."""
    backend = MemoryBackend.isolated()
    for _ in range(3):
        await backend.publish_message("jobs", {"x": 1}, headers={"idempotency-key": "k1"})
    handler = Counting()
    store = MemoryStore()
    policy = Pipeline().idempotent(store, header="idempotency-key")
    outcomes = await run_until_settled(ResilientConsumer(backend, policy=policy), handler, 3)
    assert handler.runs == 1
    assert outcomes.counts == Counter({Outcome.SUCCESS: 1, Outcome.DUPLICATE: 2})
    assert backend.unacked() == []
    assert backend.size() == 0


async def test_consumer_gives_back_a_message_busy_elsewhere() -> None:
    """Through the consumer, a message claimed elsewhere past the wait is released, not acked."""
    backend = MemoryBackend.isolated()
    await backend.publish_message("jobs", {"x": 1}, headers={"idempotency-key": "k1"})
    store = MemoryStore()
    await store.claim("k1", "elsewhere", 3600)
    handler = Counting()
    clock = FakeClock()
    policy = Pipeline().idempotent(store, header="idempotency-key", wait=1, clock=clock)
    consumer = ResilientConsumer(backend, policy=policy, clock=clock)
    outcomes = await run_until_settled(consumer, handler, 1)
    assert handler.runs == 0
    assert outcomes.counts[Outcome.UNSETTLED] >= 1
    assert set(outcomes.counts) == {Outcome.UNSETTLED}
    assert backend.size() + len(backend.unacked()) == 1  # given back, never acked


async def test_dead_letter_write_error_is_unsettled() -> None:
    """The dead-letter write error is one kind of unsettled outcome (given back)."""
    assert issubclass(DeadLetterWriteError, Unsettled)
    assert issubclass(InProgressElsewhere, Unsettled)


async def test_sqlite_store_lifecycle(tmp_path: Path) -> None:
    """SQLite: claim, busy for others, completed after completion, expired by wall time."""
    now = [1000.0]
    store = SQLiteStore(tmp_path / "idem.sqlite3", now=lambda: now[0])
    assert await store.claim("k", "a", 30) is ClaimState.CLAIMED
    assert await store.claim("k", "b", 30) is ClaimState.BUSY
    async with store.complete("k", "a", 100, delivery()) as transaction:
        assert transaction is None
    assert await store.claim("k", "b", 30) is ClaimState.COMPLETED
    now[0] += 100
    assert await store.claim("k", "b", 30) is ClaimState.CLAIMED
    await store.release("k", "a")  # not a's: nothing happens
    assert await store.claim("k", "c", 30) is ClaimState.BUSY
    await store.release("k", "b")
    assert await store.claim("k", "c", 30) is ClaimState.CLAIMED
    now[0] += 31
    assert await store.purge() == 1


async def test_sqlite_store_refuses_completion_after_takeover(tmp_path: Path) -> None:
    """SQLite: a claim taken over after its lease ended cannot be completed by the old owner."""
    now = [0.0]
    store = SQLiteStore(tmp_path / "idem.sqlite3", now=lambda: now[0])
    await store.claim("k", "a", 10)
    now[0] = 11
    await store.claim("k", "b", 10)
    with pytest.raises(ClaimLost):
        async with store.complete("k", "a", 100, delivery()):
            pass
    assert await store.claim("k", "c", 10) is ClaimState.BUSY


async def test_sqlite_store_survives_a_new_store_object(tmp_path: Path) -> None:
    """SQLite: a completion record written by one store object is seen by another (restart)."""
    path = tmp_path / "idem.sqlite3"
    handler = Counting()
    await Pipeline(Idempotency(SQLiteStore(path))).build(handler)(delivery())
    again = delivery()
    await Pipeline(Idempotency(SQLiteStore(path))).build(handler)(again)
    assert handler.runs == 1
    assert again.outcome is Outcome.DUPLICATE


async def test_no_transaction_outside_the_handler() -> None:
    """current_transaction() is None outside the layer and with stores without one."""
    seen: list[object] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(current_transaction())

    clock = FakeClock()
    await Pipeline(Idempotency(MemoryStore(clock=clock), clock=clock)).build(handler)(delivery())
    assert seen == [None]
    assert current_transaction() is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lease": 0}, "idempotency.lease must be > 0"),
        ({"ttl": -1}, "idempotency.ttl must be > 0"),
        ({"wait": "soon"}, "idempotency.wait must be a number"),
        ({"header": ""}, "idempotency.header must be a non-empty string"),
        ({"key": 3}, "idempotency.key must be a function"),
    ],
)
def test_layer_arguments_are_validated(options: dict[str, Any], message: str) -> None:
    """Bad layer arguments raise ConfigError naming the option."""
    with pytest.raises(ConfigError, match=message):
        Idempotency(MemoryStore(), **options)


def test_layer_refuses_something_that_is_not_a_store() -> None:
    """A store without claim/complete/release is refused with a clear error."""
    with pytest.raises(ConfigError, match="claim/complete/release"):
        Idempotency(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"store": "mongo"}, "idempotency.store must be one of sqlite, redis, postgres, memory"),
        ({"store": "postgres"}, "idempotency.url is required"),
        ({"lease": 0}, "idempotency.lease must be > 0"),
        ({"header": "a", "key": "m:f"}, "set header or key, not both"),
        ({"key": "nomodule"}, "idempotency.key must look like 'module:function'"),
        ({"leese": 1}, "unknown key in idempotency: leese"),
    ],
)
def test_policy_section_is_validated(section: dict[str, Any], message: str) -> None:
    """The [idempotency] section names the bad key and the allowed values."""
    with pytest.raises(ConfigError, match=message):
        Policy.from_dict({"idempotency": section})


def test_policy_places_the_layer_inside_dead_letter_and_outside_retry(tmp_path: Path) -> None:
    """Policy builds the layer between dead-letter routing and retry, and round-trips."""
    data = {
        "dead_letter": {"destination": "memory"},
        "idempotency": {"store": "sqlite", "path": str(tmp_path / "i.db"), "header": "id"},
    }
    policy = Policy.from_dict(data)
    names = [type(layer).__name__ for layer in policy.layers()]
    assert names.index("DeadLetterRouter") < names.index("Idempotency") < names.index("Retry")
    assert Policy.from_dict(policy.to_dict()).to_dict() == policy.to_dict()
    assert Policy.from_dict({"idempotency": {"enabled": False}}).layers() == [
        layer for layer in Policy().layers()
    ] or all(
        type(layer).__name__ != "Idempotency"
        for layer in Policy.from_dict({"idempotency": {"enabled": False}}).layers()
    )


async def test_duplicates_are_counted_and_marked_on_the_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Telemetry counts duplicates in resilience.duplicates and marks their span's outcome."""
    from tests.resilience.test_telemetry import install

    otel = install(monkeypatch)
    backend = MemoryBackend.isolated()
    for _ in range(3):
        await backend.publish_message("orders", {"x": 1}, headers={"idempotency-key": "k"})
    policy = Policy.from_dict({"idempotency": {"store": "memory", "header": "idempotency-key"}})
    consumer = ResilientConsumer(backend, "billing", policy=policy, clock=FakeClock())
    handler = Counting()
    await run_until_settled(consumer, handler, 3)
    assert handler.runs == 1
    points = otel.points("resilience.duplicates")
    assert [p.value for p in points] == [2]
    outcomes = sorted(
        str((span.attributes or {}).get("resilience.outcome")) for span in otel.finished()
    )
    assert outcomes == ["duplicate", "duplicate", "success"]
    otel.tracer_provider.shutdown()
    otel.meter_provider.shutdown()


class FlakyStore(MemoryStore):
    """A memory store that is down for its first ``claims`` claims and its first
    ``completions`` completion records (after the handler ran)."""

    def __init__(self, clock: FakeClock, *, claims: int = 0, completions: int = 0) -> None:
        super().__init__(clock=clock)
        self.claims_down = claims
        self.completions_down = completions
        self.failures = 0

    async def claim(self, key: str, owner: str, lease: float) -> ClaimState:
        if self.claims_down > 0:
            self.claims_down -= 1
            self.failures += 1
            raise ConnectionError("idempotency store is down")
        return await super().claim(key, owner, lease)

    @contextlib.asynccontextmanager
    async def complete(
        self, key: str, owner: str, ttl: float, delivery: Delivery
    ) -> AsyncIterator[None]:
        async with super().complete(key, owner, ttl, delivery) as transaction:
            yield transaction
            if self.completions_down > 0:
                self.completions_down -= 1
                self.failures += 1
                raise ConnectionError("idempotency store went down before the record")


async def _through_consumer(
    store: FlakyStore, clock: FakeClock, messages: int, settlements: int
) -> tuple[MemoryBackend, Counting, Any]:
    """Consume ``messages`` through dead-letter routing, the layer and retries until
    ``settlements`` outcomes (give-backs included) are reported."""
    backend = MemoryBackend.isolated(keys=["jobs"])
    for n in range(messages):
        await backend.publish_message("jobs", {"n": n})
    handler = Counting()
    policy = (
        Pipeline()
        .dead_letter(DeadLetterMemoryStore(), clock=clock)
        .idempotent(store, clock=clock)
        .retry(attempts=3, wait=Fixed(0), clock=clock)
    )
    consumer = ResilientConsumer(backend, policy=policy, clock=clock)
    outcomes = await run_until_settled(consumer, handler, settlements)
    return backend, handler, outcomes


async def test_store_down_before_the_handler_gives_messages_back() -> None:
    """Fault injection: the store fails the first claims. Those deliveries are given back
    (unsettled), no retry is spent and nothing is dead-lettered or lost; each message then runs
    once, after a growing backoff on the clock."""
    clock = FakeClock()
    store = FlakyStore(clock, claims=4)
    backend, handler, outcomes = await _through_consumer(store, clock, 3, 3 + 4)
    assert outcomes.counts == Counter({Outcome.UNSETTLED: 4, Outcome.SUCCESS: 3})
    assert handler.runs == 3  # the handler never ran for a failed claim
    assert backend.size("jobs.dlq") == 0  # 4 give-backs, 3 attempts: no delivery limit hit
    assert backend.size("jobs") == 0
    assert backend.unacked() == []
    waits = [s for s in clock.sleeps if s > 0]
    assert len(waits) == 4
    assert waits == sorted(waits)  # the backoff grows with consecutive failures
    assert all(store.completed(f"jobs/{m}") for m in ("1", "2", "3"))


async def test_store_down_after_the_handler_gives_the_message_back() -> None:
    """Fault injection: the completion record cannot be written. The delivery is given back,
    not dead-lettered; its redelivery runs again (the plain store's window) and completes."""
    clock = FakeClock()
    store = FlakyStore(clock, completions=1)
    backend, handler, outcomes = await _through_consumer(store, clock, 1, 1 + 1)
    assert outcomes.counts == Counter({Outcome.UNSETTLED: 1, Outcome.SUCCESS: 1})
    assert handler.runs == 2
    assert backend.size("jobs.dlq") == 0
    assert backend.unacked() == []
    assert backend.size() == 0


async def test_store_errors_are_unsettled() -> None:
    """A store failure is one kind of unsettled outcome, raised after the backoff."""
    clock = FakeClock()
    store = FlakyStore(clock, claims=1)
    call = Pipeline(Idempotency(store, clock=clock)).build(Counting())
    with pytest.raises(StoreUnavailable) as info:
        await call(delivery())
    assert isinstance(info.value, Unsettled)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert clock.sleeps
    assert clock.sleeps[-1] > 0


async def test_a_message_deferred_to_the_broker_is_not_completed() -> None:
    """A message whose next attempt was handed to the broker (tiered retry: outcome deferred)
    is not done: no completion record is written and the claim is released, so the deferred
    attempt runs when it comes back instead of being acknowledged as a duplicate."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    handler = Counting()

    async def defer(delivery: Delivery, call_next: CallNext) -> None:
        await call_next(delivery)
        delivery.outcome = Outcome.DEFERRED

    call = Pipeline(Idempotency(store, clock=clock), defer).build(handler)
    first = Delivery({"n": 1}, key="orders", message_id="1-0")
    await call(first)
    assert first.outcome is Outcome.DEFERRED
    assert not store.completed("orders/1-0")
    assert await store.claim("orders/1-0", "next", 5) is ClaimState.CLAIMED
