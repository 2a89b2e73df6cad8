"""Smoke tests of the benchmarks: each runs on a tiny size. No timing assertions (benchmarks are
not tests); what is asserted is correctness: determinism, accounting, outputs and errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from abe.backends.message_queue.base import InboundMessage
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.bench import (
    SCENARIOS,
    NamedPolicy,
    RunResult,
    SimulationStalled,
    Workload,
    builtin_policies,
    compare,
    load_policy,
    parse_scenario,
    run_virtual,
    simulate,
)
from resilience.bench.memory import format_memory, measure_memory
from resilience.bench.overhead import _ratios, format_overhead, measure_overhead
from resilience.bench.policies import has_section
from resilience.bench.redis_throughput import (
    RedisUnavailable,
    format_throughput,
    measure_throughput,
)
from resilience.bench.report import ProgressBar, format_comparison
from resilience.cli import main
from resilience.consumer import ResilientConsumer
from resilience.errors import ConfigError
from resilience.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
TINY = Workload(messages=60, rate=0.5, concurrency=4, seed=3)


def _policy(name: str) -> NamedPolicy:
    return builtin_policies()[name]


def _accounted(result: RunResult) -> int:
    return result.succeeded + result.dead_lettered + result.dropped + result.lost + result.pending


# -- the virtual-time loop -----------------------------------------------------------------------


def test_virtual_loop_jumps_to_the_next_timer() -> None:
    """An hour of sleeping on the virtual-time loop ends with the loop clock at one hour."""

    async def sleeper() -> float:
        await asyncio.sleep(3600)
        return asyncio.get_running_loop().time()

    assert run_virtual(sleeper()) == pytest.approx(3600)


def test_virtual_loop_reports_a_deadlock() -> None:
    """A task waiting for a future nobody resolves makes the loop raise SimulationStalled."""

    async def stuck() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(SimulationStalled):
        run_virtual(stuck())


# -- the policy comparison -------------------------------------------------------------------------


def test_same_seed_gives_identical_numbers() -> None:
    """Two runs with the same seed produce equal results; another seed produces different ones."""
    scenario = parse_scenario("transient:p=0.3")
    policy = _policy("retry-exponential")
    first = simulate(policy, scenario, TINY)
    again = simulate(policy, scenario, TINY)
    other = simulate(policy, scenario, Workload(messages=60, rate=0.5, concurrency=4, seed=4))
    assert first == again
    assert first.to_dict() | {"wall": 0} == again.to_dict() | {"wall": 0}
    assert first != other


def _policies_json(*args: str, hash_seed: str) -> dict[str, Any]:
    """`resilience bench policies --json -` run in a fresh process, without the wall times."""
    done = subprocess.run(
        [sys.executable, "-m", "resilience", "bench", "policies", "--json", "-", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    for run in document["results"]:
        assert run.pop("wall") >= 0
    return document


def test_policies_json_at_concurrency_8_is_identical_across_processes() -> None:
    """Eight workers, a breaker and messages waking at the same simulated instant: two
    processes with the same seed (and different hash seeds) write the same JSON."""
    args = [
        "--concurrency",
        "8",
        "--messages",
        "200",
        "--seed",
        "1",
        "--scenario",
        "transient",
        "--scenario",
        "rate_limited:start=30,duration=120",
        "--policy",
        "retry-exponential",
        "--policy",
        "breaker-retry",
        "--no-progress",
    ]
    first = _policies_json(*args, hash_seed="1")
    again = _policies_json(*args, hash_seed="2")
    assert [(r["scenario"], r["policy"]) for r in first["results"]] == [
        ("transient", "retry-exponential"),
        ("transient", "breaker-retry"),
        ("rate_limited:start=30,duration=120", "retry-exponential"),
        ("rate_limited:start=30,duration=120", "breaker-retry"),
    ]
    assert first == again


# A worker starts its next message in the loop step that settled the previous one, so when
# several messages wake at the same simulated instant (the rate limiter's next window, the
# breaker closing) a fresh message can reach the dependency before them. These runs depend on
# that order (benchmarks/README.md, section 1): a change to it shows here first.
@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            "retry-exponential",
            {"succeeded": 127, "retried": 61, "dead_lettered": 73, "lost": 0, "calls": 637},
        ),
        (
            "breaker-retry",
            {"succeeded": 200, "retried": 19, "dead_lettered": 0, "lost": 0, "calls": 295},
        ),
    ],
)
def test_rate_limited_runs_pin_the_worker_order(policy: str, expected: dict[str, int]) -> None:
    """Eight workers under a rate limit give these numbers, on every run."""
    result = simulate(
        _policy(policy),
        parse_scenario("rate_limited:start=30,duration=120"),
        Workload(messages=200, concurrency=8, seed=1),
    )
    assert {name: getattr(result, name) for name in expected} == expected


def test_an_hour_of_outage_runs_on_virtual_time() -> None:
    """A one-hour outage is simulated in full and every message is accounted for."""
    scenario = parse_scenario("outage:start=60,duration=3600")
    result = simulate(_policy("retry-patient"), scenario, Workload(messages=80, rate=0.02))
    assert result.simulated > 3660
    assert _accounted(result) == 80
    assert result.drain_time is not None
    assert result.calls > 80  # retries kept calling the dead dependency


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_builtin_scenario_accounts_for_every_message(name: str) -> None:
    """Each built-in scenario runs and every message ends up in exactly one column."""
    result = simulate(_policy("retry-exponential"), parse_scenario(name), TINY)
    assert result.scenario == name
    assert _accounted(result) == TINY.messages
    assert result.calls >= TINY.messages - result.pending
    assert result.latency_p50 is not None
    assert result.latency_p50 <= result.latency_p95 <= result.latency_p99  # type: ignore[operator]


def test_no_retry_baseline_makes_one_call_per_message() -> None:
    """The no-retry baseline calls the dependency exactly once per message (amplification 1)."""
    result = simulate(_policy("no-retry"), parse_scenario("transient:p=0.5"), TINY)
    assert result.calls == TINY.messages
    assert result.amplification == 1.0
    assert result.succeeded < TINY.messages


def test_terminal_failures_are_dead_lettered_not_lost() -> None:
    """With dead-letter routing every failed message is a dead-letter record; none is lost."""
    if not has_section("dead_letter"):
        pytest.skip("resilience.dead_letter is not installed")
    result = simulate(_policy("no-retry"), parse_scenario("transient:p=0.5"), TINY)
    assert result.dead_lettered > 0
    assert result.lost == 0
    assert result.succeeded + result.dead_lettered == TINY.messages


def test_policy_without_dead_letter_destination_reports_losses(tmp_path: Path) -> None:
    """A TOML policy with no dead-letter section loses its terminal failures, and says so."""
    path = tmp_path / "bare.toml"
    path.write_text("retry = false\n[timeout]\nattempt = 5\n")
    named = load_policy(f"bare={path}")
    assert named.name == "bare"
    assert named.source == str(path)
    result = simulate(named, parse_scenario("transient:p=0.5"), TINY)
    assert result.lost > 0
    assert result.lost + result.succeeded == TINY.messages


class _SwallowingConsumer(ResilientConsumer):
    """A broken consumer: it hides every handler error, so the pipeline reports success."""

    async def run(self, handler: Any) -> None:
        async def swallow(payload: dict[str, Any]) -> None:
            with contextlib.suppress(Exception):
                await handler(payload)

        await super().run(swallow)


class _SilentlyAckingBackend(MemoryBackend):
    """A broken backend: it acknowledges every third delivery without handing it out."""

    async def deliveries(  # type: ignore[override]
        self, *, group: str | None = None
    ) -> AsyncIterator[InboundMessage]:
        async for message in super().deliveries(group=group):
            if message.payload.get("n", 1) % 3 == 0:
                await self.ack(message)
                continue
            yield message


def test_lost_counts_failures_a_consumer_reports_as_successes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Messages the dependency refused but the consumer called successes are counted as lost."""
    sim = sys.modules["resilience.bench.simulate"]
    monkeypatch.setattr(sim, "ResilientConsumer", _SwallowingConsumer)
    result = simulate(_policy("no-retry"), parse_scenario("transient:p=0.5"), TINY)
    assert result.lost > 0
    assert result.succeeded + result.lost == TINY.messages
    assert result.dead_lettered == 0


def test_lost_counts_messages_acknowledged_without_an_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Messages that left the backend with no outcome at all are lost, not pending."""
    sim = sys.modules["resilience.bench.simulate"]
    monkeypatch.setattr(sim, "MemoryBackend", _SilentlyAckingBackend)
    result = simulate(_policy("no-retry"), parse_scenario("healthy"), TINY)
    assert result.pending == 0
    assert result.lost == len(range(0, TINY.messages, 3))
    assert result.succeeded == TINY.messages - result.lost


def test_policy_file_dead_letters_go_to_the_simulated_backend(tmp_path: Path) -> None:
    """A policy file's dead-letter store is swapped for the in-memory backend during the run."""
    if not has_section("dead_letter"):
        pytest.skip("resilience.dead_letter is not installed")
    store = tmp_path / "dlq.sqlite3"
    path = tmp_path / "sqlite.toml"
    path.write_text(f'retry = false\n[dead_letter]\ndestination = "sqlite"\npath = "{store}"\n')
    result = simulate(load_policy(str(path)), parse_scenario("transient:p=0.5"), TINY)
    assert result.dead_lettered > 0
    assert not store.exists()


def test_breaker_open_time_is_reported_for_breaker_policies() -> None:
    """A policy with a circuit breaker reports how long it was open; others report None."""
    if "breaker-retry" not in builtin_policies():
        pytest.skip("resilience.breaker is not installed")
    scenario = parse_scenario("outage:start=10,duration=120")
    workload = Workload(messages=40, rate=0.2)
    with_breaker = simulate(_policy("breaker-retry"), scenario, workload)
    without = simulate(_policy("retry-exponential"), scenario, workload)
    assert with_breaker.breaker_open is not None
    assert with_breaker.breaker_open > 0
    assert without.breaker_open is None


def test_compare_runs_every_pair_and_reports_progress() -> None:
    """compare() runs scenario x policy pairs in order and ends its progress at 100%."""
    seen: list[tuple[int, int, str, float]] = []
    policies = [_policy("no-retry"), _policy("retry-exponential")]
    scenarios = [parse_scenario("transient"), parse_scenario("poison")]
    results = compare(policies, scenarios, TINY, progress=lambda *a: seen.append(a))
    assert [(r.scenario, r.policy) for r in results] == [
        ("transient", "no-retry"),
        ("transient", "retry-exponential"),
        ("poison", "no-retry"),
        ("poison", "retry-exponential"),
    ]
    assert seen[-1] == (4, 4, "done", 1.0)
    table = format_comparison(results, scenarios, TINY)
    assert "transient: random transient failures" in table
    assert "retry-exponential" in table


REDELIVERY = "redelivery:lost_acks=0.2,slow_rate=0.1"


def test_redelivery_scenario_counts_duplicates_with_and_without_the_layer() -> None:
    """Lost acknowledgements and expired visibility make the handler complete messages twice
    without the idempotency layer, never with it; nothing is lost, and runs are deterministic."""
    if not has_section("idempotency"):
        pytest.skip("resilience.idempotency is not installed")
    scenario = parse_scenario(REDELIVERY)
    plain = simulate(_policy("no-retry"), scenario, TINY)
    layered = simulate(_policy("no-retry-idempotent"), scenario, TINY)
    assert plain.redelivered > 0
    assert plain.duplicates > 0
    assert plain.duplicates_skipped == 0
    assert plain.calls == TINY.messages + plain.duplicates
    assert layered.redelivered > 0
    assert layered.duplicates == 0
    assert layered.duplicates_skipped > 0
    for result in (plain, layered):
        assert result.succeeded == TINY.messages
        assert result.lost == result.pending == result.dead_lettered == 0
    assert simulate(_policy("no-retry-idempotent"), scenario, TINY) == layered
    with pytest.raises(ConfigError, match="visibility"):
        parse_scenario("redelivery:visibility=0")
    table = format_comparison([plain, layered], [scenario], TINY)
    assert "duplicates" in table
    assert f"{plain.duplicates}!" in table


def test_cli_redelivery_reports_duplicates_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`bench policies --scenario redelivery` puts the duplicate counts in the JSON."""
    if not has_section("idempotency"):
        pytest.skip("resilience.idempotency is not installed")
    args = ["bench", "policies", "--messages", "40", "--scenario", REDELIVERY, "--json", "-"]
    policies = ["--policy", "retry-exponential", "--policy", "retry-exponential-idempotent"]
    assert main([*args, *policies]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["policy"] for r in results] == ["retry-exponential", "retry-exponential-idempotent"]
    assert results[0]["duplicates"] > 0
    assert results[1]["duplicates"] == 0
    assert results[1]["duplicates_skipped"] > 0


def test_user_scenario_from_an_import_path() -> None:
    """A Scenario subclass is loaded from MODULE:CLASS with parameters, and labelled by them."""
    scenario = parse_scenario("benchmarks.scenarios:FlakyDeploy:error_rate=0.9,window=300")
    assert scenario.params()["error_rate"] == 0.9
    result = simulate(_policy("no-retry"), scenario, TINY)
    assert result.scenario == "flaky_deploy:error_rate=0.9,window=300"
    assert result.succeeded < TINY.messages


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("outage:durtion=5", ["durtion", "duration"]),
        ("nope", ["unknown scenario", "outage"]),
        ("transient:p=2", ["p", "between 0 and 1"]),
        ("rate_limited:limit=1.5", ["limit", "integer"]),
        ("outage:start", ["key=value"]),
        ("benchmarks.scenarios:Missing", ["cannot import"]),
    ],
)
def test_bad_scenario_specs_are_rejected_by_name(spec: str, words: list[str]) -> None:
    """A malformed scenario spec raises ConfigError naming the culprit."""
    with pytest.raises(ConfigError) as info:
        parse_scenario(spec)
    for word in words:
        assert word in str(info.value)


def test_unknown_policy_names_the_choices() -> None:
    """An unknown policy name raises ConfigError listing the built-in names."""
    with pytest.raises(ConfigError, match="no-retry"):
        load_policy("sometimes-retry")


def test_workload_is_validated() -> None:
    """Impossible workloads raise ConfigError naming the field."""
    with pytest.raises(ConfigError, match="messages"):
        Workload(messages=0)
    with pytest.raises(ConfigError, match="rate"):
        Workload(rate=0)
    with pytest.raises(ConfigError, match="concurrency"):
        Workload(concurrency=0)


def test_cli_writes_table_json_and_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resilience bench policies` prints the table and writes JSON and a PNG chart."""
    report, chart = tmp_path / "r.json", tmp_path / "c.png"
    code = main(
        [
            "bench",
            "policies",
            "--messages",
            "30",
            "--policy",
            "no-retry",
            "--policy",
            "retry-exponential",
            "--scenario",
            "transient",
            "--json",
            str(report),
            "--chart",
            str(chart),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "retry-exponential" in out
    assert f"chart written to {chart}" in out
    document = json.loads(report.read_text())
    assert [r["policy"] for r in document["results"]] == ["no-retry", "retry-exponential"]
    assert document["workload"]["messages"] == 30
    assert document["machine"]["nproc"] == os.cpu_count()
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_to_stdout_is_only_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`--json -` prints a JSON document and nothing else on stdout."""
    code = main(
        [
            "bench",
            "policies",
            "--messages",
            "20",
            "--policy",
            "no-retry",
            "--scenario",
            "poison",
            "--json",
            "-",
        ]
    )
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["benchmark"] == "policies"
    assert document["results"][0]["scenario"] == "poison"


def test_cli_rejects_bad_input_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad scenario or duplicate policy ends with exit code 2 and a one-line error."""
    assert main(["bench", "policies", "--scenario", "outage:durtion=5"]) == 2
    assert "durtion" in capsys.readouterr().err
    assert main(["bench", "policies", "--policy", "no-retry", "--policy", "no-retry"]) == 2
    assert "unique" in capsys.readouterr().err


def test_cli_lists_policies_and_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    """`--list` names every built-in policy and scenario."""
    assert main(["bench", "policies", "--list"]) == 0
    out = capsys.readouterr().out
    for name in [*builtin_policies(), *SCENARIOS]:
        assert name in out


def test_progress_bar_draws_only_when_enabled() -> None:
    """The bar shows the overall share and ends with a newline; disabled, it writes nothing."""
    stream = io.StringIO()
    bar = ProgressBar(stream, enabled=True, width=10)
    bar(1, 4, "outage / no-retry", 0.5)
    bar(4, 4, "done", 1.0)
    text = stream.getvalue()
    assert "38%" in text
    assert "outage / no-retry" in text
    assert text.endswith("\n")
    quiet = io.StringIO()
    ProgressBar(quiet, enabled=False)(1, 2, "x", 0.0)
    ProgressBar(quiet)(1, 2, "x", 0.0)  # a StringIO is not a terminal
    assert quiet.getvalue() == ""


def test_builtin_policies_round_trip_through_toml(tmp_path: Path) -> None:
    """Every built-in policy is a plain Policy that survives TOML, as users' files do."""
    for name, named in builtin_policies().items():
        path = tmp_path / f"{name}.toml"
        path.write_text(named.policy.to_toml())
        assert Policy.from_toml(path) == named.policy


# -- overhead, memory, broker throughput -----------------------------------------------------


def test_overhead_benchmark_runs_and_reports_ratios() -> None:
    """The overhead benchmark measures every contender and computes the six target ratios."""
    report = measure_overhead(messages=300, rounds=1)
    costs = report["per_message_us"]
    assert costs["bare"] > 0
    assert costs["pipeline"] > 0
    assert set(report["per_call_us"]) == {
        "direct call",
        "Retry middleware",
        "tenacity AsyncRetrying",
    }
    names = [r["name"] for r in report["ratios"]]
    assert names[:8] == [
        "pipeline / bare consumer",
        "Policy() / bare consumer",
        "tenacity per call / Retry middleware",
        "telemetry without SDK",
        "telemetry with SDK / bare span",
        "telemetry with SDK / bare span+histogram",
        "histogram record / bare span",
        "traces only / bare span",
    ]
    assert "pipeline / bare consumer" in format_overhead(report)
    json.dumps(report)


def test_overhead_ratios_compare_telemetry_like_for_like() -> None:
    """The telemetry ratios divide the project's added cost by the reference's; the literal
    span-only target is marked unreachable when one histogram record alone costs more than a
    quarter of the span."""
    per_message = {
        "bare": 1.0,
        "pipeline": 1.5,
        "pipeline+telemetry (SDK)": 31.5,
        "pipeline+telemetry (SDK, traces only)": 22.5,
        "bare+otel span": 21.0,
        "bare+otel span+histogram": 31.0,
    }
    per_call = {"direct call": 0.1, "Retry middleware": 0.3, "tenacity AsyncRetrying": 20.1}
    ratios = {r["name"]: r for r in _ratios(per_message, per_call)}
    assert ratios["telemetry with SDK / bare span"]["value"] == pytest.approx(1.5)
    assert ratios["telemetry with SDK / bare span"]["met"] is False
    assert "unreachable" in ratios["telemetry with SDK / bare span"]["note"]
    assert ratios["telemetry with SDK / bare span+histogram"]["value"] == pytest.approx(1.0)
    assert ratios["telemetry with SDK / bare span+histogram"]["met"] is True
    assert ratios["histogram record / bare span"]["value"] == pytest.approx(0.5)
    assert ratios["traces only / bare span"]["value"] == pytest.approx(1.05)
    assert ratios["tenacity per call / Retry middleware"]["value"] == pytest.approx(100.0)
    cheap = {**per_message, "bare+otel span+histogram": 23.0}
    ratios = {r["name"]: r for r in _ratios(cheap, per_call)}
    assert ratios["telemetry with SDK / bare span"]["note"] is None


def test_overhead_ratios_hold_every_user_shape_to_twice_bare() -> None:
    """Each row users run (total timeout at 1, 8 and 64 workers, Policy() on 8 workers, a
    listener, the log context) gets a target of at most twice the bare consumer, and the
    concurrent pipeline is compared with a hand-written task-per-message consumer."""
    per_message = {
        "bare": 1.0,
        "pipeline": 1.5,
        "resilient, no middleware": 1.2,
        "pipeline+total timeout": 1.8,
        "pipeline+total timeout, concurrency 8": 1.9,
        "pipeline+total timeout, concurrency 64": 2.2,
        "Policy(), concurrency 8": 1.6,
        "pipeline+listener": 1.9,
        "pipeline+log context": 1.7,
        "task per message, concurrency 8": 3.0,
        "task per message, concurrency 64": 2.0,
    }
    per_call = {"direct call": 0.1, "Retry middleware": 0.3, "tenacity AsyncRetrying": 20.1}
    ratios = {r["name"]: r for r in _ratios(per_message, per_call)}
    assert ratios["pipeline+total timeout, concurrency 8 / bare consumer"]["met"] is True
    assert ratios["pipeline+total timeout, concurrency 64 / bare consumer"]["value"] == (
        pytest.approx(2.2)
    )
    assert ratios["pipeline+total timeout, concurrency 64 / bare consumer"]["met"] is False
    assert ratios["pipeline+log context / bare consumer"]["met"] is True
    assert ratios["pipeline, 8 workers / task per message"]["value"] == pytest.approx(1.9 / 3.0)
    assert ratios["pipeline, 8 workers / task per message"]["met"] is True
    assert ratios["pipeline, 64 workers / task per message"]["met"] is False


def test_memory_benchmark_runs() -> None:
    """The memory benchmark pushes every message through and samples resident memory."""
    report = measure_memory(messages=3000, batch=500)
    assert report["messages"] == 3000
    assert report["samples"]
    assert report["growth_mb"] is not None
    assert report["max_rss_mb"] >= max(s["rss_mb"] for s in report["samples"])
    assert report["max_rss_mb"] >= report["rss_final_mb"]
    assert "growth" in format_memory(report)


def test_success_path_benchmarks_do_not_print_policy_advice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Building the full pipeline many times logs no build-time advice, and logging is restored."""
    caplog.set_level(logging.DEBUG)
    logger = logging.getLogger("resilience.policy")
    before = logger.level
    measure_memory(messages=1000, batch=500)
    measure_overhead(messages=50, rounds=1)
    assert [r for r in caplog.records if r.name == "resilience.policy"] == []
    assert logger.level == before


def test_memory_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`resilience bench memory --json -` prints the report as JSON."""
    assert main(["bench", "memory", "--messages", "1000", "--batch", "500", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["messages"] == 1000


@pytest.mark.broker
def test_redis_throughput_benchmark_runs() -> None:
    """The Redis benchmark drains the stream with every contender and leaves nothing pending."""
    url = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/0")
    try:
        report = measure_throughput(url=url, messages=300, rounds=1)
    except RedisUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{exc}; CI=true, so broker tests must run")
        pytest.skip(str(exc))
    rates = report["messages_per_second"]
    assert set(rates) == {
        "ResilientConsumer",
        "ResilientConsumer, Policy()",
        "ResilientConsumer, no middleware",
        "ResilientConsumer (backend defaults)",
        "hand-written",
        "abe-redis pattern",
    }
    assert all(rate > 0 for rate in rates.values())
    assert [r["name"] for r in report["ratios"]] == [
        "ResilientConsumer / hand-written",
        "ResilientConsumer, Policy() / hand-written",
        "ResilientConsumer / abe-redis pattern",
    ]
    assert set(report["unacknowledged_after_drain"].values()) == {0}
    assert "hand-written" in format_throughput(report)
    idempotency = report["idempotency"]
    assert set(idempotency["unacknowledged_after_drain"].values()) == {0}
    steady = idempotency["steady_round_trips_per_message"]
    # Each message's claim is one round trip; its completion travels with the next claim.
    extra = steady["full pipeline + idempotency (Redis)"] - steady["full pipeline"]
    assert 0.9 <= extra <= 1.1
    assert "extra round trips per message" in format_throughput(report)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        (
            "policies.py",
            ["--messages", "20", "--policy", "no-retry", "--scenario", "transient"],
            "no-retry",
        ),
        ("overhead.py", ["--messages", "200", "--rounds", "1"], "pipeline / bare consumer"),
        ("memory.py", ["--messages", "2000", "--batch", "500"], "growth"),
    ],
    ids=["policies", "overhead", "memory"],
)
def test_benchmark_scripts_run_as_programs(script: str, args: list[str], expected: str) -> None:
    """Each script in benchmarks/ runs its command from a checkout on a tiny size."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
