"""Replay (library API), replay-loop limits, summaries for the demo, and the policy section."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import (
    DEAD_LETTER_TRACEPARENT_HEADER,
    REPLAY_COUNT_HEADER,
    REPLAY_OF_HEADER,
    DeadLetterConfig,
    DeadLetterRouter,
    EnvelopeOptions,
    Filter,
    MemoryStore,
    SQLiteStore,
    describe,
    policy_section,
    replay,
    replay_headers,
    summarize,
)
from resilience.errors import ConfigError
from resilience.events import Outcome
from resilience.pipeline import Pipeline
from resilience.policy import Policy
from resilience.retry import Retry
from resilience.testing import run_until_settled
from resilience.timeout import Timeout

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Orders:
    """A handler that fails with ValueError until ``fixed`` is set."""

    def __init__(self) -> None:
        self.fixed = False
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.seen.append(payload)
        if not self.fixed:
            raise ValueError(f"cannot handle order {payload.get('order')}")


async def consume(backend: MemoryBackend, store: Any, handler: Orders, count: int) -> list[Outcome]:
    """Run a consumer with a dead-letter layer into ``store`` until ``count`` settle."""
    clock = FakeClock()
    pipeline = Pipeline(DeadLetterRouter(store, clock=clock), Retry(attempts=2, clock=clock))
    consumer = ResilientConsumer(backend, policy=pipeline, clock=clock)
    outcomes = await run_until_settled(consumer, handler, count)
    return [e.outcome for e in outcomes.settled]


async def test_replay_round_trip_through_the_library(tmp_path: Path) -> None:
    """Dead-letter, fix the handler, replay to the source key, and the message is processed."""
    backend = MemoryBackend.isolated()
    store = SQLiteStore(tmp_path / "dl.sqlite3")
    handler = Orders()
    await backend.publish_message("orders", {"order": 1}, headers={"traceparent": TRACEPARENT})
    assert await consume(backend, store, handler, 1) == [Outcome.DEAD_LETTERED]
    (record,) = await store.find()

    handler.fixed = True
    report = await replay(store, backend)
    assert report.ok
    assert report.replayed == [(record.id, "orders")]
    (message,) = backend.peek("orders")
    assert message.payload == {"order": 1}
    assert message.headers[REPLAY_COUNT_HEADER] == "1"
    assert message.headers[REPLAY_OF_HEADER] == record.id
    assert message.headers["traceparent"] == TRACEPARENT
    assert await consume(backend, store, handler, 1) == [Outcome.SUCCESS]
    assert handler.seen[-1] == {"order": 1}
    (after,) = await store.find()
    assert after.replayed_at is not None
    assert after.replay_target == "orders"


async def test_replay_is_idempotent_per_envelope_unless_forced() -> None:
    """A second replay skips envelopes already replayed; force replays them again."""
    backend = MemoryBackend.isolated()
    store = MemoryStore()
    await backend.publish("orders", {"order": 1})
    await consume(backend, store, Orders(), 1)
    await replay(store, backend)
    again = await replay(store, backend)
    assert again.replayed == []
    assert list(again.skipped.values()) == ["already_replayed"]
    forced = await replay(store, backend, force=True)
    assert len(forced.replayed) == 1
    assert backend.size("orders") == 2
    (record,) = await store.find()
    assert record.replays == 2


async def test_replay_loop_is_stopped_by_the_limit() -> None:
    """A message that keeps failing is replayed max_replays times, then refused."""
    backend = MemoryBackend.isolated()
    store = MemoryStore()
    handler = Orders()
    await backend.publish("orders", {"order": 9})
    await consume(backend, store, handler, 1)
    reports = []
    for _ in range(5):
        report = await replay(store, backend, max_replays=2, where=Filter(replayed=False))
        reports.append(report)
        if not report.replayed:
            break
        await consume(backend, store, handler, 1)
    assert [len(r.replayed) for r in reports] == [1, 1, 0]
    assert list(reports[-1].skipped.values()) == ["replay_limit"]
    assert [e["replay_count"] for e in store.envelopes] == [0, 1, 2]
    assert backend.size() == 0


async def test_dry_run_publishes_and_marks_nothing() -> None:
    """A dry run reports what it would replay without touching the backend or the store."""
    backend = MemoryBackend.isolated()
    store = MemoryStore()
    await backend.publish("orders", {"order": 1})
    await consume(backend, store, Orders(), 1)
    report = await replay(store, None, dry_run=True, to_key="orders.retry")
    assert report.dry_run
    assert [key for _, key in report.replayed] == ["orders.retry"]
    assert backend.size() == 0
    assert (await store.find())[0].replayed_at is None


async def test_replay_rate_limit_waits_on_the_clock() -> None:
    """With rate=4 per second, publishes are spaced 0.25 s apart on the injected clock."""
    backend = MemoryBackend.isolated()
    store = MemoryStore()
    for i in range(3):
        await backend.publish("orders", {"order": i})
    await consume(backend, store, Orders(), 3)
    clock = FakeClock()
    report = await replay(store, backend, rate=4, clock=clock)
    assert len(report.replayed) == 3
    assert clock.sleeps == pytest.approx([0.25, 0.25])


async def test_replay_refuses_payloads_it_no_longer_holds_intact() -> None:
    """Redacted payloads (unless allowed), truncated and undecodable ones are skipped."""
    backend = MemoryBackend.isolated()
    store = MemoryStore()
    router = DeadLetterRouter(store, options=EnvelopeOptions(max_envelope_bytes=4096))

    async def fail(payload: dict[str, Any]) -> None:
        raise ValueError("no")

    consumer = ResilientConsumer(backend, policy=Pipeline(router), clock=FakeClock())
    await backend.publish("orders", {"order": 1, "password": "hunter22"})
    await backend.publish("orders", {"order": 2, "blob": "x" * 10_000})
    await run_until_settled(consumer, fail, 2)
    report = await replay(store, backend)
    assert sorted(report.skipped.values()) == ["redacted", "truncated"]
    allowed = await replay(store, backend, allow_redacted=True)
    assert len(allowed.replayed) == 1
    assert backend.peek("orders")[0].payload == {"order": 1, "password": "[REDACTED]"}


async def test_replay_stops_at_the_first_publish_failure() -> None:
    """A failing publish stops the replay, is reported, and leaves the envelope unmarked."""

    class Broken(MemoryBackend):
        async def publish_message(self, *args: Any, **kwargs: Any) -> str | None:
            raise ConnectionError("broker down")

    backend = MemoryBackend.isolated()
    store = MemoryStore()
    for i in range(2):
        await backend.publish("orders", {"order": i})
    await consume(backend, store, Orders(), 2)
    report = await replay(store, Broken(backend.channel))
    assert not report.ok
    assert len(report.failed) == 1
    assert "broker down" in next(iter(report.failed.values()))
    assert report.replayed == []
    assert all(r.replayed_at is None for r in await store.find())


async def test_replay_without_header_support_says_so() -> None:
    """A backend without headers still gets the payload; the report flags the lost headers."""

    class Plain:
        def __init__(self) -> None:
            self.published: list[tuple[str, dict[str, Any]]] = []

        async def publish(self, key: str, payload: dict[str, Any]) -> None:
            self.published.append((key, payload))

    backend = MemoryBackend.isolated()
    store = MemoryStore()
    await backend.publish("orders", {"order": 1})
    await consume(backend, store, Orders(), 1)
    plain = Plain()
    report = await replay(store, plain)  # type: ignore[arg-type]
    assert plain.published == [("orders", {"order": 1})]
    assert report.headers_dropped


def test_replay_headers_link_both_traces_and_drop_masked_values() -> None:
    """Replay headers carry the next count, both trace links, and never a masked value."""
    envelope = {
        "id": "abc",
        "replay_count": 1,
        "headers": {
            "traceparent": TRACEPARENT,
            "authorization": "[REDACTED]",
            "x-tenant": "t1",
            REPLAY_COUNT_HEADER: "1",
        },
        "trace": {
            "original": {"traceparent": TRACEPARENT, "tracestate": "k=v"},
            "processing": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        },
    }
    assert replay_headers(envelope) == {
        "traceparent": TRACEPARENT,
        "tracestate": "k=v",
        "x-tenant": "t1",
        REPLAY_COUNT_HEADER: "2",
        REPLAY_OF_HEADER: "abc",
        DEAD_LETTER_TRACEPARENT_HEADER: "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
    }


async def test_replay_rejects_bad_arguments() -> None:
    """Impossible rates and limits, or a real run without a backend, raise ValueError."""
    store = MemoryStore()
    with pytest.raises(ValueError, match="rate"):
        await replay(store, MemoryBackend.isolated(), rate=0)
    with pytest.raises(ValueError, match="max_replays"):
        await replay(store, MemoryBackend.isolated(), max_replays=-1)
    with pytest.raises(ValueError, match="backend"):
        await replay(store, None)


async def test_summary_for_the_demo(tmp_path: Path) -> None:
    """summarize() counts by reason and pending; describe() tells how to list and replay."""
    backend = MemoryBackend.isolated()
    store = SQLiteStore(tmp_path / "dl.sqlite3")
    for i in range(3):
        await backend.publish("orders", {"order": i})
    await consume(backend, store, Orders(), 3)
    await replay(store, backend, where=Filter(ids=((await store.find())[0].id,)))
    summary = await summarize(store)
    assert summary.total == 3
    assert summary.pending == 2
    assert summary.by_reason == {"retries_exhausted": 3}
    lines = describe(summary, db="dl.sqlite3")
    assert lines[0].startswith("Dead letters: 3 (retries_exhausted 3); 2 not replayed yet")
    assert "resilience dlq list --db dl.sqlite3" in lines[1]
    assert "resilience dlq replay --db dl.sqlite3 --dry-run" in lines[3]
    assert "QUEUE_BACKEND" in lines[4]  # a real replay needs the consumers' broker
    assert describe(await summarize(MemoryStore())) == ["No dead letters."]


# -- the [dead_letter] policy section ----------------------------------------------------------


def test_policy_section_defaults_and_round_trip() -> None:
    """[dead_letter] parses with defaults and survives to_dict and TOML round trips."""
    policy = Policy.from_dict(
        {"dead_letter": {"path": "x.sqlite3", "redact": ["pin"], "service_name": "billing"}}
    )
    config = policy.sections["dead_letter"]
    assert isinstance(config, DeadLetterConfig)
    assert config.destination == "sqlite"
    assert config.redact == ("pin",)
    assert config.key_suffix == ".dlq"
    assert Policy.from_dict(policy.to_dict()) == policy
    assert Policy.from_dict(Policy.from_dict(policy.to_dict()).to_dict()) == policy
    assert policy_section.order == 20


def test_policy_section_from_toml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The section reads from TOML, and RESILIENCE_DEAD_LETTER__* variables override it."""
    path = tmp_path / "policy.toml"
    path.write_text('[dead_letter]\ndestination = "memory"\nmax_traceback_frames = 5\n')
    policy = Policy.load(path, environ={"RESILIENCE_DEAD_LETTER__DESTINATION": "sqlite"})
    config = policy.sections["dead_letter"]
    assert config.destination == "sqlite"
    assert config.max_traceback_frames == 5
    reloaded = tmp_path / "again.toml"
    reloaded.write_text(policy.to_toml())
    assert Policy.from_toml(reloaded) == policy


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"destination": "kafka"}, "destination must be one of sqlite, backend, memory"),
        ({"pathh": "x"}, "unknown key in dead_letter: pathh"),
        ({"max_envelope_bytes": 10}, "dead_letter.max_envelope_bytes must be an integer >= 4096"),
        ({"redact": "password"}, None),
        ({"redact": [1]}, "dead_letter.redact must be a list of strings"),
        ({"validate": "nocolon"}, "dead_letter.validate must look like 'module:function'"),
        ({"validate": "no_such_module_x:f"}, "cannot import 'no_such_module_x:f'"),
        ({"validate": "json:__doc__"}, "is not callable"),
        ({"write_failure_backoff": -1}, "dead_letter.write_failure_backoff must be >= 0"),
        ({"write_attempts": 0}, "dead_letter.write_attempts must be >= 1"),
        ({"write_attempts": 1.5}, "dead_letter.write_attempts must be an integer"),
        ({"path": ""}, "dead_letter.path must not be empty"),
    ],
)
def test_policy_section_validates_loudly(section: dict[str, Any], message: str | None) -> None:
    """Bad [dead_letter] values raise a ConfigError naming the key and what is allowed."""
    if message is None:
        config = Policy.from_dict({"dead_letter": section}).sections["dead_letter"]
        assert config.redact == ("password",)
        return
    with pytest.raises(ConfigError) as info:
        Policy.from_dict({"dead_letter": section})
    assert message in str(info.value)


def test_policy_puts_the_router_in_its_recommended_place(tmp_path: Path) -> None:
    """The router sits outside the total timeout and retry, with the policy's classifier."""
    policy = Policy.from_dict(
        {
            "dead_letter": {"path": str(tmp_path / "dl.sqlite3"), "service_name": "svc"},
            "timeout": {"attempt": 1, "total": 5},
            "classify": {"terminal": ["KeyError"]},
        }
    )
    layers = policy.layers(backend=MemoryBackend.isolated())
    assert [type(x).__name__ for x in layers] == ["DeadLetterRouter", "Timeout", "Retry", "Timeout"]
    router = layers[0]
    assert isinstance(router, DeadLetterRouter)
    assert isinstance(router.sink, SQLiteStore)
    assert router.sink.path == tmp_path / "dl.sqlite3"
    assert router.options.service_name == "svc"
    assert isinstance(layers[1], Timeout)
    assert layers[1].total


def test_dead_letter_config_is_frozen() -> None:
    """The parsed config is immutable."""
    config = DeadLetterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.path = "elsewhere"  # type: ignore[misc]
