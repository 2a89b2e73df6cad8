"""The durable SQLite dead-letter store: restarts, concurrent writers, queries, purge."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import (
    AmbiguousId,
    EnvelopeBuilder,
    Filter,
    MemoryStore,
    SQLiteStore,
)
from resilience.dead_letter.sqlite import StoreVersionError
from resilience.delivery import Delivery
from resilience.errors import DeadLetter
from resilience.events import Outcome
from resilience.policy import Policy
from resilience.testing import run_until_settled

ROOT = Path(__file__).resolve().parents[2]


def envelope(
    reason: str = "non_retryable",
    *,
    key: str = "orders",
    exc: BaseException | None = None,
    at: float = 1_000.0,
    payload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A real envelope built by EnvelopeBuilder."""
    delivery = Delivery(payload or {"n": 1}, key=key, message_id="1")
    return EnvelopeBuilder().build(
        delivery,
        exc or ValueError("bad"),
        reason=reason,
        stage="handle",
        monotonic_now=0.0,
        wall_now=at,
    )


async def test_store_survives_a_process_restart(tmp_path: Path) -> None:
    """Envelopes written by another process are read back after it exited."""
    db = tmp_path / "dl" / "store.sqlite3"
    script = textwrap.dedent(
        f"""
        import asyncio
        from resilience.dead_letter import EnvelopeBuilder, SQLiteStore
        from resilience.delivery import Delivery

        async def main():
            store = SQLiteStore({str(db)!r})
            for i in range(3):
                env = EnvelopeBuilder().build(
                    Delivery({{"n": i}}, key="orders"), ValueError(f"bad {{i}}"),
                    reason="non_retryable", stage="handle", monotonic_now=0.0)
                await store.write(env)
            print("written")

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "written"
    records = await SQLiteStore(db, create=False).find()
    assert [r.envelope["payload"] for r in records] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [r.envelope["error"]["message"] for r in records] == ["bad 0", "bad 1", "bad 2"]


def test_a_confirmed_write_survives_the_process_being_killed(tmp_path: Path) -> None:
    """A consumer killed with SIGKILL right after its dead letters were confirmed keeps them:
    the next process reads every envelope (the store commits before write() returns)."""
    db = tmp_path / "store.sqlite3"
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from abe.backends.message_queue.service.memory import MemoryBackend
        from resilience.clock import FakeClock
        from resilience.consumer import ResilientConsumer
        from resilience.errors import DeadLetter
        from resilience.policy import Policy
        from resilience.testing import run_until_settled

        async def handler(payload):
            raise DeadLetter("bad order")

        async def main():
            backend = MemoryBackend.isolated()
            for n in range(5):
                await backend.publish("orders", {{"n": n}})
            policy = Policy.from_dict({{"dead_letter": {{"path": {str(db)!r}}}}})
            consumer = ResilientConsumer(backend, policy=policy, clock=FakeClock())
            await run_until_settled(consumer, handler, 5)
            print("confirmed", flush=True)
            await asyncio.Event().wait()  # killed here, before any orderly shutdown

        asyncio.run(main())
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        lines = iter(child.stdout.readline, "")
        assert any(line.strip() == "confirmed" for line in lines)  # after the log lines
        child.kill()
        child.wait(timeout=60)
    records = asyncio.run(SQLiteStore(db, create=False).find())
    assert sorted(r.envelope["payload"]["n"] for r in records) == [0, 1, 2, 3, 4]
    assert {r.reason for r in records} == {"rejected"}


async def test_reopening_the_file_keeps_records_and_replay_marks(tmp_path: Path) -> None:
    """A new store object on the same file sees earlier writes and replay bookkeeping."""
    db = tmp_path / "store.sqlite3"
    first = SQLiteStore(db)
    env = envelope()
    await first.write(env)
    assert await first.mark_replayed(env["id"], target="orders", at=5.0)
    second = SQLiteStore(db)
    record = await second.get(env["id"])
    assert record is not None
    assert record.envelope == env
    assert record.replayed_at == 5.0
    assert record.replay_target == "orders"
    assert record.replays == 1


async def test_concurrent_writers_in_one_process(tmp_path: Path) -> None:
    """Many concurrent writes (worker threads, one connection each) all land."""
    store = SQLiteStore(tmp_path / "store.sqlite3")
    envelopes = [envelope(payload={"n": i}) for i in range(40)]
    await asyncio.gather(*(store.write(e) for e in envelopes))
    records = await store.find()
    assert sorted(r.envelope["payload"]["n"] for r in records) == list(range(40))


async def test_writing_the_same_envelope_twice_keeps_one(tmp_path: Path) -> None:
    """A retried write of an envelope id is idempotent."""
    store = SQLiteStore(tmp_path / "store.sqlite3")
    env = envelope()
    await store.write(env)
    await store.write(env)
    assert len(await store.find()) == 1


async def test_write_rejects_non_envelopes(tmp_path: Path) -> None:
    """Only dlq.v1 envelopes are accepted."""
    store = SQLiteStore(tmp_path / "store.sqlite3")
    with pytest.raises(ValueError, match=r"dlq\.v1"):
        await store.write({"schema": "other", "id": "x"})


@pytest.fixture(params=["sqlite", "memory"])
async def filled(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A store (each kind) holding five envelopes with different reasons, keys, types, times."""
    store: Any = (
        SQLiteStore(tmp_path / "store.sqlite3") if request.param == "sqlite" else MemoryStore()
    )
    rows = [
        envelope("non_retryable", key="orders", exc=ValueError("a"), at=100.0),
        envelope("retries_exhausted", key="orders", exc=ConnectionError("b"), at=200.0),
        envelope("rejected", key="users", exc=DeadLetter("c"), at=300.0),
        envelope("retries_exhausted", key="users", exc=ConnectionError("d"), at=400.0),
        envelope("timeout", key="orders", exc=TimeoutError("e"), at=500.0),
    ]
    for row in rows:
        await store.write(row)
    await store.mark_replayed(rows[1]["id"], target="orders", at=600.0)
    return store, rows


async def test_filters_select_by_reason_type_key_time_and_state(filled: Any) -> None:
    """Every filter field narrows the result, and values of one field match any of them."""
    store, rows = filled

    async def messages(where: Filter) -> list[str]:
        return [r.envelope["error"]["message"] for r in await store.find(where)]

    assert await messages(Filter()) == ["a", "b", "c", "d", "e"]
    assert await messages(Filter(reasons=("retries_exhausted",))) == ["b", "d"]
    assert await messages(Filter(reasons=("rejected", "timeout"))) == ["c", "e"]
    assert await messages(Filter(error_types=("ConnectionError",))) == ["b", "d"]
    assert await messages(Filter(error_types=("resilience.errors.DeadLetter",))) == ["c"]
    assert await messages(Filter(error_types=("DeadLetter",))) == ["c"]
    assert await messages(Filter(keys=("users",))) == ["c", "d"]
    assert await messages(Filter(since=200.0, until=400.0)) == ["b", "c"]
    assert await messages(Filter(replayed=True)) == ["b"]
    assert await messages(Filter(replayed=False, keys=("orders",))) == ["a", "e"]
    assert await messages(Filter(ids=(rows[3]["id"],))) == ["d"]


async def test_find_orders_and_limits(filled: Any) -> None:
    """Results are oldest first, or newest first with a limit."""
    store, _ = filled
    newest = await store.find(limit=2, newest_first=True)
    assert [r.envelope["error"]["message"] for r in newest] == ["e", "d"]


async def test_get_by_id_or_unique_prefix(filled: Any) -> None:
    """get() takes a full id or a unique prefix; an ambiguous prefix raises; unknown is None."""
    store, rows = filled
    record = await store.get(rows[2]["id"][:10])
    assert record is not None
    assert record.id == rows[2]["id"]
    assert record.reason == "rejected"
    assert record.key == "users"
    assert await store.get("zz-no-such-id") is None
    with pytest.raises(AmbiguousId):
        await store.get("")


async def test_counts_and_purge(filled: Any) -> None:
    """counts() tallies by reason; purge() deletes only what matches and says how many."""
    store, _ = filled
    assert await store.counts() == {
        "non_retryable": 1,
        "rejected": 1,
        "retries_exhausted": 2,
        "timeout": 1,
    }
    assert await store.purge(Filter(keys=("users",))) == 2
    assert await store.counts(Filter(replayed=False)) == {"non_retryable": 1, "timeout": 1}
    assert await store.purge() == 3
    assert await store.find() == []


async def test_mark_replayed_of_an_unknown_id_is_false(filled: Any) -> None:
    """Marking an id that is not stored reports False."""
    store, _ = filled
    assert await store.mark_replayed("nope", target="orders") is False


async def test_purge_by_many_ids(tmp_path: Path) -> None:
    """Purging by more ids than one statement takes works in chunks, in one transaction."""
    store = SQLiteStore(tmp_path / "store.sqlite3")
    rows = [envelope() for _ in range(3)]
    for row in rows:
        await store.write(row)
    ids = tuple(f"missing-{i}" for i in range(1200)) + tuple(r["id"] for r in rows[:2])
    assert await store.purge(Filter(ids=ids)) == 2
    assert [r.id for r in await store.find()] == [rows[2]["id"]]


async def test_missing_store_is_not_created_when_asked_not_to(tmp_path: Path) -> None:
    """With create=False a missing file raises FileNotFoundError and is not created."""
    store = SQLiteStore(tmp_path / "nope.sqlite3", create=False)
    with pytest.raises(FileNotFoundError, match="no dead-letter store"):
        await store.find()
    assert not store.exists()


async def test_a_newer_store_version_is_refused(tmp_path: Path) -> None:
    """A file written by a newer schema version is refused rather than misread."""
    db = tmp_path / "store.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreVersionError, match="version 99"):
        await SQLiteStore(db).find()


async def test_store_recreates_a_deleted_file(tmp_path: Path) -> None:
    """If the file is deleted under a running store, the next write recreates it."""
    db = tmp_path / "store.sqlite3"
    store = SQLiteStore(db)
    await store.write(envelope())
    for path in tmp_path.iterdir():
        path.unlink()
    await store.write(envelope())
    assert len(await store.find()) == 1


async def test_concurrent_consumer_dead_letters_everything_into_sqlite(tmp_path: Path) -> None:
    """With 8 messages in flight all 30 failures are dead-lettered once each, none unacked."""
    db = tmp_path / "dl.sqlite3"
    backend = MemoryBackend.isolated()
    for i in range(30):
        await backend.publish("orders", {"order": i})

    async def handler(payload: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        raise DeadLetter(f"order {payload['order']}")

    policy = Policy.from_dict({"dead_letter": {"path": str(db)}})
    consumer = ResilientConsumer(backend, policy=policy, concurrency=8, clock=FakeClock())
    outcomes = await run_until_settled(consumer, handler, 30)
    assert outcomes.counts[Outcome.DEAD_LETTERED] == 30
    records = await SQLiteStore(db).find()
    assert sorted(r.envelope["payload"]["order"] for r in records) == list(range(30))
    assert backend.size() == 0
    assert backend.unacked() == []


# -- group commit ---------------------------------------------------------------------------------


def _envelopes(count: int) -> list[dict[str, Any]]:
    """``count`` envelopes with distinct ids."""
    return [envelope(payload={"n": n}, at=1_000.0 + n) for n in range(count)]


async def test_concurrent_writes_share_one_transaction(tmp_path: Path) -> None:
    """200 writes started together are committed in one transaction, and all are stored."""
    store = SQLiteStore(tmp_path / "store.sqlite3")
    await asyncio.gather(*(store.write(env) for env in _envelopes(200)))
    assert store.commits == 1
    assert len(await store.find()) == 200


async def test_no_write_returns_before_the_commit_that_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the commit of a group is held up, none of its writers has returned; they all
    return once it is committed, and then every envelope is readable."""
    store = SQLiteStore(tmp_path / "store.sqlite3")
    await store.write(envelope(payload={"warm": 1}))  # creates the file outside the gate
    entered, gate = threading.Event(), threading.Event()
    real_commit = SQLiteStore._commit

    def held_commit(self: SQLiteStore, conn: sqlite3.Connection) -> None:
        entered.set()
        assert gate.wait(timeout=30)
        real_commit(self, conn)

    monkeypatch.setattr(SQLiteStore, "_commit", held_commit)
    writers = [asyncio.create_task(store.write(env)) for env in _envelopes(20)]
    await asyncio.to_thread(entered.wait, 30)
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in writers)
    gate.set()
    await asyncio.gather(*writers)
    assert len(await store.find()) == 21


async def test_a_failed_commit_fails_every_writer_of_its_group_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the transaction's commit fails, each writer of that group gets the error (an
    object of its own), none of the envelopes is stored, and later writes work again."""
    store = SQLiteStore(tmp_path / "store.sqlite3")

    def failing_commit(self: SQLiteStore, conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SQLiteStore, "_commit", failing_commit)
    results = await asyncio.gather(
        *(store.write(env) for env in _envelopes(20)), return_exceptions=True
    )
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    assert len({id(r) for r in results}) == 20
    assert store.commits == 0
    assert await store.find() == []
    monkeypatch.undo()
    await store.write(envelope())
    assert len(await store.find()) == 1


async def test_a_consumer_acks_nothing_whose_group_commit_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 8 messages in flight and every commit failing, no message is dead-lettered or
    acked: the store stays empty and the backend still holds all 16."""
    db = tmp_path / "dl.sqlite3"
    backend = MemoryBackend.isolated()
    for i in range(16):
        await backend.publish("orders", {"order": i})

    def failing_commit(self: SQLiteStore, conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SQLiteStore, "_commit", failing_commit)

    async def handler(payload: dict[str, Any]) -> None:
        raise DeadLetter(f"order {payload['order']}")

    policy = Policy.from_dict({"dead_letter": {"path": str(db)}})
    consumer = ResilientConsumer(backend, policy=policy, concurrency=8, clock=FakeClock())
    outcomes = await run_until_settled(consumer, handler, 16)
    assert Outcome.DEAD_LETTERED not in outcomes.counts
    assert await SQLiteStore(db).find() == []
    assert backend.size() + len(backend.unacked()) == 16
