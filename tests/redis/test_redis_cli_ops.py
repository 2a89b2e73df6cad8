"""`resilience run --http` on Redis as a subprocess: metrics, breaker control, broker outages."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.broker_processes import whole_lines
from tests.cli_process import CliProcess, http, poll
from tests.redis.redis_support import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.broker]

HANDLER = """
import json
from pathlib import Path

async def handle(payload):
    with Path("seen.jsonl").open("a") as f:
        f.write(json.dumps(payload) + "\\n")
    if payload.get("fail"):
        raise ConnectionError("dependency down")
"""

DOCUMENTED_METRICS = {
    "messaging_process_duration_seconds": "histogram",
    "messaging_client_consumed_messages": "counter",
    "resilience_retries": "counter",
    "resilience_dead_letters": "counter",
    "resilience_in_flight": "gauge",
    "resilience_breaker_state": "gauge",
    "resilience_broker_connected": "gauge",
}
"""Prometheus family names (docs/operations.md) and their types."""


def seen(workdir: Path) -> list[dict[str, object]]:
    """Payloads the handler was called with, in order (whole lines only, :func:`whole_lines`:
    the handler may be writing one)."""
    return [json.loads(line) for line in whole_lines(workdir / "seen.jsonl")]


def publish(url: str, stream: str, *payloads: dict[str, object]) -> None:
    """XADD each payload as the backend's wire format (field ``data``)."""
    client = redis.Redis.from_url(url)
    try:
        for payload in payloads:
            client.xadd(stream, {"data": json.dumps(payload)})
    finally:
        client.close()


def start(workdir: Path, url: str, stream: str, policy: str, *extra: str) -> CliProcess:
    """`resilience run handler:handle --http 127.0.0.1:0` on ``stream``; waits for startup."""
    (workdir / "handler.py").write_text(HANDLER)
    (workdir / "policy.toml").write_text(policy)
    cli = CliProcess(
        workdir,
        [
            "run",
            "handler:handle",
            "--policy",
            "policy.toml",
            "--http",
            "127.0.0.1:0",
            "--log-format",
            "json",
            *extra,
        ],
        {"QUEUE_BACKEND": "redis", "REDIS_URL": url, "REDIS_STREAMS": stream},
    )
    return cli


@pytest.fixture
def stream(redis_url: str) -> object:
    """A stream name no other test uses; its keys are deleted afterwards."""
    name = f"abe-test:{uuid.uuid4().hex[:12]}:cli"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(name, f"{name}.dlq")
    finally:
        client.close()


def test_metrics_endpoint_exposes_the_documented_names(
    tmp_path: Path, redis_url: str, stream: str
) -> None:
    """GET /metrics parses as Prometheus text and carries every documented family, with the
    consumed, retried and dead-lettered counts of the run."""
    policy = (
        '[retry]\nattempts = 2\nbackoff = "fixed"\ninitial = 0.001\n'
        f'[circuit_breaker]\nname = "{stream}"\nfailure_threshold = 5\n'
        '[dead_letter]\ndestination = "backend"\n'
    )
    cli = start(tmp_path, redis_url, stream, policy)
    try:
        base = cli.started()["http"]
        publish(redis_url, stream, {"i": 1}, {"i": 2}, {"i": 3, "fail": True})

        def families() -> dict[str, object]:
            _, _, body = http("GET", f"{base}/metrics")
            return {f.name: f for f in text_string_to_metric_families(body)}

        def consumed() -> float:
            family = families().get("messaging_client_consumed_messages")
            return sum(s.value for s in family.samples) if family else 0.0  # type: ignore[attr-defined]

        poll(lambda: consumed() >= 3, what="three messages consumed")
        found = families()
        assert cli.stop() == 0
    finally:
        cli.kill()
    for name, kind in DOCUMENTED_METRICS.items():
        assert name in found, sorted(found)
        assert found[name].type == kind  # type: ignore[attr-defined]
    dead = found["resilience_dead_letters"].samples  # type: ignore[attr-defined]
    assert [(s.labels["resilience_dead_letter_reason"], s.value) for s in dead] == [
        ("retries_exhausted", 1.0)
    ]
    retries = found["resilience_retries"].samples  # type: ignore[attr-defined]
    assert sum(s.value for s in retries if s.name.endswith("_total")) == 1.0
    connected = found["resilience_broker_connected"].samples  # type: ignore[attr-defined]
    assert [s.value for s in connected] == [1.0]


def test_breaker_control_over_http_pauses_and_resumes_consumption(
    tmp_path: Path, redis_url: str, stream: str
) -> None:
    """POST /breakers/NAME/open stops consumption (readyz 503), close resumes it, reset closes
    the breaker again; nothing published meanwhile is lost."""
    policy = f'[circuit_breaker]\nname = "{stream}"\nmode = "pause"\n'
    cli = start(tmp_path, redis_url, stream, policy)
    try:
        base = cli.started()["http"]
        publish(redis_url, stream, {"i": 0})
        poll(lambda: len(seen(tmp_path)) == 1, what="the first message")
        status, body, _ = http("POST", f"{base}/breakers/{stream}/open")
        assert (status, body["state"]) == (200, "forced_open")
        status, ready, _ = http("GET", f"{base}/readyz")
        assert status == 503
        assert ready["reasons"] == [f"circuit breaker {stream!r} is open"]
        publish(redis_url, stream, {"i": 1}, {"i": 2}, {"i": 3})
        time.sleep(1.0)  # long enough for a consumer that ignored the breaker to take them
        assert len(seen(tmp_path)) == 1
        status, body, _ = http("POST", f"{base}/breakers/{stream}/close")
        assert (status, body["state"]) == (200, "forced_closed")
        poll(lambda: len(seen(tmp_path)) == 4, what="the held messages")
        status, body, _ = http("POST", f"{base}/breakers/{stream}/reset")
        assert (status, body["state"]) == (200, "closed")
        status, listing, _ = http("GET", f"{base}/breakers")
        assert [b["name"] for b in listing["breakers"]] == [stream]
        status, missing, _ = http("POST", f"{base}/breakers/nope/open")
        assert status == 404
        assert stream in missing["known"]
        assert http("GET", f"{base}/readyz")[0] == 200
        assert cli.stop() == 0
    finally:
        cli.kill()
    assert [p["i"] for p in seen(tmp_path)] == [0, 1, 2, 3]


def test_breaker_cli_talks_to_the_endpoint(tmp_path: Path, redis_url: str, stream: str) -> None:
    """`resilience breaker list|open|reset --http ADDR` prints and changes the breaker state."""
    import subprocess
    import sys

    policy = f'[circuit_breaker]\nname = "{stream}"\n'
    cli = start(tmp_path, redis_url, stream, policy)
    try:
        address = cli.started()["http"].removeprefix("http://")

        def breaker(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "resilience", "breaker", *args, "--http", address],
                capture_output=True,
                text=True,
                timeout=30,
            )

        opened = breaker("open", stream)
        listed = breaker("list")
        reset = breaker("reset", stream)
        unknown = breaker("open", "nope")
        assert cli.stop() == 0
    finally:
        cli.kill()
    assert opened.returncode == 0, opened.stderr
    assert f"{stream}: forced_open" in opened.stdout
    assert stream in listed.stdout
    assert "forced_open" in listed.stdout
    assert f"{stream}: closed" in reset.stdout
    assert unknown.returncode == 1
    assert "no circuit breaker named 'nope'" in unknown.stderr


def test_broker_outage_is_visible_and_readiness_follows_it(tmp_path: Path) -> None:
    """A private Redis stopped under a running consumer: repeated warnings with growing attempt
    counts, readyz 503 and the connected gauge at 0; after a restart readyz is 200 again and a
    message published then is processed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path / "data")
    (tmp_path / "data").mkdir()
    server.start()
    cli = start(tmp_path, server.url, "outage", "[retry]\nattempts = 2\n")
    try:
        base = cli.started()["http"]
        assert http("GET", f"{base}/readyz")[0] == 200
        server.kill()

        def not_ready() -> bool:
            status, body, _ = http("GET", f"{base}/readyz")
            return status == 503 and any("broker unreachable" in r for r in body["reasons"])

        poll(not_ready, what="readyz 503")
        first = cli.wait_event("unavailable for")
        later = cli.wait_for(
            lambda e: (
                "unavailable for" in str(e.get("event"))
                and e is not first
                and "(attempt 3)" in str(e.get("event"))
            ),
            what="a third warned attempt",
        )
        assert first["level"] == later["level"] == "warning"
        _, _, metrics = http("GET", f"{base}/metrics")
        assert "resilience_broker_connected{" in metrics
        assert [
            s.value
            for f in text_string_to_metric_families(metrics)
            if f.name == "resilience_broker_connected"
            for s in f.samples
        ] == [0.0]
        server.start()
        poll(lambda: http("GET", f"{base}/readyz")[0] == 200, what="readyz 200 again")
        cli.wait_event("reachable again")
        publish(server.url, "outage", {"after": "restart"})
        poll(lambda: seen(tmp_path) == [{"after": "restart"}], what="a message after restart")
        assert cli.stop() == 0
    finally:
        cli.kill()
        server.kill()
    assert "Traceback" not in cli.text()


def test_gauges_are_in_the_final_metric_export(tmp_path: Path, redis_url: str, stream: str) -> None:
    """With --otel console, the export at exit still carries the consumed-messages counter and
    the in-flight gauge with the run's figures."""
    import subprocess
    import sys

    (tmp_path / "handler.py").write_text(HANDLER)
    publish(redis_url, stream, {"i": 1}, {"i": 2})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resilience",
            "run",
            "handler:handle",
            "--otel",
            "console",
            "--max-messages",
            "2",
            "--log-format",
            "json",
        ],
        cwd=tmp_path,
        env={
            **{k: v for k, v in __import__("os").environ.items() if not k.startswith("REDIS_")},
            "QUEUE_BACKEND": "redis",
            "REDIS_URL": redis_url,
            "REDIS_STREAMS": stream,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    final = proc.stderr[proc.stderr.rindex('"resource_metrics"') :]
    assert '"messaging.client.consumed.messages"' in final
    assert '"resilience.in_flight"' in final
    consumed = final[final.index('"messaging.client.consumed.messages"') :]
    assert '"value": 2' in consumed[: consumed.index('"resilience.in_flight"')]
