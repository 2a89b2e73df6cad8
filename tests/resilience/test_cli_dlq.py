"""``resilience dlq list | show | replay | purge``, run in-process through ``main()``."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.cli import main
from resilience.cli.dlq import parse_time
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import REPLAY_COUNT_HEADER, EnvelopeBuilder, SQLiteStore
from resilience.delivery import Delivery
from resilience.errors import DeadLetter
from resilience.events import Outcome
from resilience.policy import Policy
from resilience.testing import run_until_settled

ROOT = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No QUEUE_BACKEND or RESILIENCE_* from the shell, and an empty shared memory queue."""
    monkeypatch.delenv("QUEUE_BACKEND", raising=False)
    monkeypatch.delenv("RESILIENCE_DEAD_LETTER__PATH", raising=False)
    MemoryBackend.reset_shared()
    yield
    MemoryBackend.reset_shared()


def write(db: Path, rows: list[tuple[str, str, BaseException, float]]) -> list[str]:
    """Store one envelope per (reason, key, exception, time) row; returns their ids."""
    builder = EnvelopeBuilder(system="memory", handler_name="app:handle")
    store = SQLiteStore(db)
    ids: list[str] = []

    async def go() -> None:
        for n, (reason, key, exc, at) in enumerate(rows):
            delivery = Delivery({"order": n}, key=key, message_id=str(n))
            env = builder.build(
                delivery, exc, reason=reason, stage="handle", monotonic_now=0.0, wall_now=at
            )
            await store.write(env)
            ids.append(env["id"])

    asyncio.run(go())
    return ids


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, list[str]]:
    """A store with four dead letters: two keys, three reasons, times 2026-01-01 00:00..03:00."""
    path = tmp_path / "dl.sqlite3"
    base = parse_time("2026-01-01T00:00:00Z")
    ids = write(
        path,
        [
            ("retries_exhausted", "orders", ConnectionError("reset"), base),
            ("non_retryable", "orders", ValueError("no customer"), base + 3600),
            ("rejected", "users", DeadLetter("banned"), base + 7200),
            ("retries_exhausted", "users", ConnectionError("reset"), base + 10800),
        ],
    )
    return path, ids


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["dlq", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_prints_a_table(
    db: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """dlq list shows one row per dead letter with id, time, key, reason and error."""
    path, ids = db
    code, out, _ = run(capsys, "list", "--db", str(path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID", "DEAD-LETTERED", "KEY", "REASON", "ERROR", "ATTEMPTS", "REPLAYS", "REPLAYED"
    ]  # fmt: skip
    assert lines[1].startswith(ids[0][:12])
    assert "2026-01-01 00:00:00Z" in lines[1]
    assert "retries_exhausted" in lines[1]
    assert "ConnectionError" in lines[1]
    assert "DeadLetter" in lines[3]
    assert lines[-1].startswith("4 dead letter(s)")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--reason", "retries_exhausted"], [0, 3]),
        (["--reason", "rejected", "--reason", "non_retryable"], [1, 2]),
        (["--key", "users"], [2, 3]),
        (["--error-type", "ValueError"], [1]),
        (["--error-type", "resilience.errors.DeadLetter"], [2]),
        (["--since", "2026-01-01T01:00Z", "--until", "2026-01-01T03:00"], [1, 2]),
        (["--limit", "2"], [2, 3]),
        (["--pending"], [0, 1, 2, 3]),
        (["--replayed"], []),
    ],
)
def test_list_filters_as_json(
    db: tuple[Path, list[str]],
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    expected: list[int],
) -> None:
    """Filters narrow dlq list; --json prints the full records."""
    path, ids = db
    code, out, _ = run(capsys, "list", "--db", str(path), "--json", *options)
    assert code == 0
    records = json.loads(out)
    assert [r["id"] for r in records] == [ids[i] for i in expected]
    if records:
        assert records[0]["envelope"]["schema"] == "dlq.v1"


def test_list_relative_since_and_id_prefix(
    db: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """--since accepts '2h' (ago) and --id accepts a unique prefix."""
    path, ids = db
    code, out, _ = run(capsys, "list", "--db", str(path), "--since", "2h")
    assert (code, out.strip()) == (0, "No dead letters match.")
    code, out, _ = run(capsys, "list", "--db", str(path), "--json", "--id", ids[2][:8])
    assert [r["id"] for r in json.loads(out)] == [ids[2]]


def test_show_prints_one_dead_letter(
    db: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """dlq show ID prints the envelope's parts for a unique id prefix, or JSON."""
    path, ids = db
    code, out, _ = run(capsys, "show", "--db", str(path), ids[1][:10])
    assert code == 0
    assert f"id             {ids[1]}" in out
    assert "reason         non_retryable (stage handle)" in out
    assert "error          ValueError: no customer" in out
    assert "handler=app:handle" in out
    assert '"order": 1' in out
    code, out, _ = run(capsys, "show", "--db", str(path), "--json", ids[1])
    assert json.loads(out)["envelope"]["error"]["message"] == "no customer"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "nope"], "no dead letter with id 'nope'"),
        (["show", ""], "matches several dead letters"),
        (["list", "--since", "yesterday-ish"], "cannot read time 'yesterday-ish'"),
        (["list", "--id", "zzz"], "no dead letter with id 'zzz'"),
    ],
)
def test_user_errors_are_one_line(
    db: tuple[Path, list[str]],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """Unknown ids, ambiguous prefixes and unreadable times exit 2 with one error line."""
    path, _ = db
    code, _, err = run(capsys, *argv, "--db", str(path))
    assert code == 2
    assert message in err
    assert err.count("\n") == 1


def test_missing_store_is_an_error_not_an_empty_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store path with no file exits 2 (a typo must not look like 'no dead letters')."""
    code, _, err = run(capsys, "list", "--db", str(tmp_path / "typo.sqlite3"))
    assert code == 2
    assert "no dead-letter store at" in err
    assert not (tmp_path / "typo.sqlite3").exists()


def test_store_path_from_policy_and_environment(
    db: tuple[Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --db the path comes from --policy's [dead_letter] or RESILIENCE_DEAD_LETTER__PATH."""
    path, _ = db
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[dead_letter]\npath = {json.dumps(str(path))}\n")
    code, out, _ = run(capsys, "list", "--policy", str(policy), "--json")
    assert (code, len(json.loads(out))) == (0, 4)
    monkeypatch.setenv("RESILIENCE_DEAD_LETTER__PATH", str(path))
    code, out, _ = run(capsys, "list", "--json")
    assert (code, len(json.loads(out))) == (0, 4)
    memory = tmp_path / "memory.toml"
    memory.write_text('[dead_letter]\ndestination = "memory"\n')
    monkeypatch.delenv("RESILIENCE_DEAD_LETTER__PATH")
    code, _, err = run(capsys, "list", "--policy", str(memory))
    assert code == 2
    assert "'memory' destination" in err


def test_purge_with_yes_deletes_only_matches(
    db: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """purge --yes deletes what the filters select and nothing else."""
    path, ids = db
    code, out, _ = run(capsys, "purge", "--db", str(path), "--key", "users", "--yes")
    assert (code, out.strip()) == (0, "Purged 2 dead letter(s).")
    remaining = asyncio.run(SQLiteStore(path).find())
    assert [r.id for r in remaining] == ids[:2]


def test_purge_refuses_without_confirmation_when_not_interactive(
    db: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --yes and without a terminal to ask on, purge refuses and deletes nothing."""
    path, _ = db
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    code, _, err = run(capsys, "purge", "--db", str(path))
    assert code == 2
    assert "refusing to purge 4 dead letter(s) without confirmation: pass --yes" in err
    assert len(asyncio.run(SQLiteStore(path).find())) == 4


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "code", "left"), [("y", 0, 2), ("n", 1, 4), ("", 1, 4)])
def test_purge_asks_for_confirmation(
    db: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
    code: int,
    left: int,
) -> None:
    """On a terminal purge asks first; only 'y' deletes."""
    path, _ = db
    monkeypatch.setattr(sys, "stdin", _Terminal(answer + "\n"))
    got, out, _ = run(capsys, "purge", "--db", str(path), "--reason", "retries_exhausted")
    assert got == code
    assert "Purge 2 dead letter(s) from" in out
    assert len(asyncio.run(SQLiteStore(path).find())) == left


def test_purge_with_no_match_is_a_no_op(
    db: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Purging with filters that match nothing says so and exits 0."""
    path, _ = db
    code, out, _ = run(capsys, "purge", "--db", str(path), "--key", "nothing-here")
    assert (code, out.strip()) == (0, "No dead letters match; nothing purged.")


def test_replay_dry_run_lists_targets_and_changes_nothing(
    db: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run prints what would go where, publishes nothing and marks nothing."""
    path, ids = db
    code, out, _ = run(capsys, "replay", "--db", str(path), "--dry-run", "--key", "orders")
    assert code == 0
    assert out.splitlines()[0] == "2 selected; would replay 2"
    assert f"  {ids[0][:12]} -> orders" in out
    assert MemoryBackend().size() == 0
    assert all(r.replayed_at is None for r in asyncio.run(SQLiteStore(path).find()))


def test_replay_to_another_key_as_json_with_progress(
    db: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """replay --to-key publishes there; --json prints the report; --progress draws a bar."""
    path, ids = db
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    code, out, err = run(
        capsys, "replay", "--db", str(path), "--to-key", "retry", "--json", "--progress"
    )
    assert code == 0
    report = json.loads(out)
    assert [r["key"] for r in report["replayed"]] == ["retry"] * 4
    assert [m.payload["order"] for m in MemoryBackend().peek("retry")] == [0, 1, 2, 3]
    assert "replaying [##############################] 4/4" in err
    assert "resilience: warning: MemoryBackend is for development" in err
    code, out, _ = run(capsys, "replay", "--db", str(path))
    assert out.splitlines()[:3] == [
        "4 selected; replayed (via MemoryBackend) 0",
        "skipped 4 already_replayed",
        "  (already_replayed: use --force to replay again)",
    ]
    assert ids


def test_replay_reports_an_unknown_backend(
    db: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A QUEUE_BACKEND that is not installed is an error naming it, and nothing is marked."""
    path, _ = db
    monkeypatch.setenv("QUEUE_BACKEND", "no-such-broker")
    code, _, err = run(capsys, "replay", "--db", str(path))
    assert code == 2
    assert "Unknown backend 'no-such-broker'" in err
    assert all(r.replayed_at is None for r in asyncio.run(SQLiteStore(path).find()))


def test_replay_refuses_the_in_memory_fallback(
    db: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without QUEUE_BACKEND, replay would publish into a queue that dies with the command:
    it exits 2 naming QUEUE_BACKEND, and publishes and marks nothing."""
    path, _ = db
    code, out, err = run(capsys, "replay", "--db", str(path))
    assert code == 2
    assert out == ""
    assert "set QUEUE_BACKEND" in err
    assert "nothing was replayed or marked" in err
    assert MemoryBackend().size() == 0
    assert all(r.replayed_at is None for r in asyncio.run(SQLiteStore(path).find()))


def test_replay_to_an_explicit_memory_backend_warns(
    db: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """QUEUE_BACKEND=memory is honoured (in-process use), with a warning about losing them."""
    path, _ = db
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    code, _, err = run(capsys, "replay", "--db", str(path), "--key", "users")
    assert code == 0
    assert "lost when it exits" in err
    assert MemoryBackend().size() == 2


class Orders:
    """Fails every order with ValueError until fixed."""

    def __init__(self) -> None:
        self.fixed = False
        self.processed: list[dict[str, Any]] = []

    async def __call__(self, payload: dict[str, Any]) -> None:
        if not self.fixed:
            raise ValueError(f"order {payload['order']}: unknown currency")
        self.processed.append(payload)


def consume(backend: MemoryBackend, handler: Orders, db: Path, count: int) -> list[Outcome]:
    """Run a ResilientConsumer dead-lettering into ``db`` until ``count`` messages settle."""
    policy = Policy.from_dict(
        {"dead_letter": {"path": str(db)}, "classify": {"terminal": ["ValueError"]}}
    )

    async def go() -> list[Outcome]:
        consumer = ResilientConsumer(backend, policy=policy, clock=FakeClock())
        outcomes = await run_until_settled(consumer, handler, count)
        return [e.outcome for e in outcomes.settled]

    return asyncio.run(go())


def test_replay_round_trip_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dead-letter, list, fix the handler, `dlq replay`, consume again: processed."""
    db = tmp_path / "dl.sqlite3"
    handler = Orders()
    source = MemoryBackend.isolated()

    async def publish() -> None:
        for order in (1, 2):
            await source.publish_message(
                "orders", {"order": order}, headers={"traceparent": TRACEPARENT}
            )

    asyncio.run(publish())
    assert consume(source, handler, db, 2) == [Outcome.DEAD_LETTERED] * 2
    assert source.size() == 0
    assert source.unacked() == []
    capsys.readouterr()

    code, out, _ = run(capsys, "list", "--db", str(db), "--reason", "non_retryable")
    assert code == 0
    assert out.count("non_retryable") == 2

    handler.fixed = True
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    code, out, _ = run(capsys, "replay", "--db", str(db), "--rate", "1000", "--no-progress")
    assert code == 0
    assert out.splitlines()[0] == "2 selected; replayed (via MemoryBackend) 2"

    shared = MemoryBackend()  # the process-wide queue load_backend() published into
    republished = shared.peek("orders")
    assert [m.headers[REPLAY_COUNT_HEADER] for m in republished] == ["1", "1"]
    assert [m.headers["traceparent"] for m in republished] == [TRACEPARENT] * 2
    assert consume(shared, handler, db, 2) == [Outcome.SUCCESS] * 2
    assert handler.processed == [{"order": 1}, {"order": 2}]

    code, out, _ = run(capsys, "list", "--db", str(db), "--pending")
    assert (code, out.strip()) == (0, "No dead letters match.")


def test_dlq_without_a_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """`resilience dlq` alone prints its usage and exits 2."""
    code, out, _ = run(capsys)
    assert code == 2
    assert "list" in out
    assert "replay" in out


def test_parse_time_accepts_iso_and_relative() -> None:
    """ISO times (naive = UTC) and 30m/2h/7d-ago forms become epoch seconds."""
    assert parse_time("1970-01-02") == 86400
    assert parse_time("1970-01-01T01:00+01:00") == 0
    assert parse_time("90s", now=1000.0) == 910.0
    assert parse_time("1.5h", now=10_000.0) == 10_000.0 - 5400
    assert parse_time("7d", now=1e6) == 1e6 - 7 * 86400


def test_module_entry_point_help() -> None:
    """`python -m resilience dlq --help` runs in a fresh process and lists the sub-commands."""
    done = subprocess.run(
        [sys.executable, "-m", "resilience", "dlq", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for command in ("list", "show", "replay", "purge"):
        assert command in done.stdout
