"""Draw docs/grafana/resilience-dashboard.png from a real `resilience run --http` (no Grafana).

Starts a private redis-server on a free port, runs ``resilience run --http`` on it with a
handler that fails now and then (transient errors retried, invalid orders dead-lettered, slow
calls), publishes orders at a steady rate, forces the circuit breaker open for a while through
the endpoint, stops Redis for a few seconds, and scrapes ``/metrics`` every second. The panels
of docs/grafana/resilience-dashboard.json are then computed from the scrapes with the same
formulas as their PromQL queries (``rate`` over a window, ``histogram_quantile`` over the
buckets) and drawn with matplotlib.

    python benchmarks/dashboard_snapshot.py [--seconds 90] [--rate 60] [--out PNG]

Needs redis-server on PATH and the ``dev`` extra (matplotlib, prometheus-client, aiohttp).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 15.0
"""Seconds of the rate window (Grafana's ``$__rate_interval`` at this scrape interval)."""

HANDLER = """
import asyncio, random

seen = set()

async def handle(payload):
    kind = payload["kind"]
    await asyncio.sleep(random.uniform(0.002, 0.02))
    if kind == "flaky" and payload["n"] not in seen:
        seen.add(payload["n"])
        raise ConnectionError("payment service blip")
    if kind == "invalid":
        raise ValueError("order has no customer")
    if kind == "slow":
        await asyncio.sleep(random.uniform(0.05, 0.3))
"""

POLICY = """
[retry]
attempts = 3
backoff = "fixed"
initial = 0.05

[timeout]
attempt = 1.0

[classify]
terminal = ["ValueError"]

[circuit_breaker]
name = "payments"
failure_threshold = 10

[dead_letter]
destination = "backend"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(directory),
            "--appendonly",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(200):
        try:
            if client.ping():
                return proc
        except redis.RedisError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def scrape(base: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = [(s.name, dict(s.labels), s.value) for s in family.samples]
    return out


def post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).read()


def run(seconds: float, rate: float) -> list[tuple[float, dict[str, Any]]]:
    """Run the consumer under load; returns ``(time, scrape)`` pairs."""
    work = Path(tempfile.mkdtemp(prefix="dashboard-"))
    port = free_port()
    server = start_redis(port, work)
    (work / "handler.py").write_text(HANDLER)
    (work / "policy.toml").write_text(POLICY)
    env = {
        **os.environ,
        "QUEUE_BACKEND": "redis",
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "REDIS_STREAMS": "orders",
    }
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resilience",
            "run",
            "handler:handle",
            "--policy",
            "policy.toml",
            "--http",
            "127.0.0.1:0",
            "--concurrency",
            "8",
            "--log-format",
            "json",
        ],
        cwd=work,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert cli.stderr is not None
    base = ""
    for line in cli.stderr:
        if '"resilience run started"' in line:
            base = json.loads(line)["http"]
            break
    if not base:
        raise SystemExit("resilience run did not start")
    threading.Thread(target=lambda: [None for _ in cli.stderr], daemon=True).start()  # type: ignore[union-attr]
    stop = threading.Event()
    redis_down = threading.Event()

    def publish() -> None:
        rng = random.Random(7)
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        n = 0
        while not stop.is_set():
            kind = rng.choices(["ok", "flaky", "invalid", "slow"], weights=(85, 10, 2, 3))[0]
            if not redis_down.is_set():
                try:
                    client.xadd("orders", {"data": json.dumps({"n": n, "kind": kind})})
                    n += 1
                except redis.RedisError:
                    pass
            time.sleep(1 / rate)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    scrapes: list[tuple[float, dict[str, Any]]] = []
    started = time.monotonic()
    events = {
        0.35: lambda: post(f"{base}/breakers/payments/open"),
        0.45: lambda: post(f"{base}/breakers/payments/reset"),
        0.65: lambda: (redis_down.set(), server.kill(), server.wait()),
    }
    restarted = False
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            for at, action in list(events.items()):
                if elapsed >= at * seconds:
                    action()
                    del events[at]
            if redis_down.is_set() and not restarted and elapsed >= 0.73 * seconds:
                server = start_redis(port, work)
                redis_down.clear()
                restarted = True
            try:
                scrapes.append((elapsed, scrape(base)))
            except OSError as exc:
                print(f"scrape failed: {exc}", file=sys.stderr)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started - elapsed)))
    finally:
        stop.set()
        cli.terminate()
        cli.wait(timeout=60)
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return scrapes


def series(
    scrapes: list[tuple[float, dict[str, Any]]], family: str, sample: str, by: str | None
) -> dict[str, list[tuple[float, float]]]:
    """Per label value of ``by`` (or one series), the summed sample values over time."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, data in scrapes:
        sums: dict[str, float] = defaultdict(float)
        for name, labels, value in data.get(family, []):
            if name == sample:
                sums[labels.get(by, "") if by else "all"] += value
        for key, value in sums.items():
            out[key].append((t, value))
    return out


def rate(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """``rate(x[WINDOW])``: increase over the window divided by its length."""
    xs, ys = [], []
    for i, (t, v) in enumerate(points):
        j = i
        while j > 0 and t - points[j - 1][0] <= WINDOW:
            j -= 1
        if j < i:
            t0, v0 = points[j]
            xs.append(t)
            ys.append(max(0.0, v - v0) / (t - t0))
    return xs, ys


def quantiles(
    scrapes: list[tuple[float, dict[str, Any]]], q: float
) -> tuple[list[float], list[float]]:
    """``histogram_quantile(q, sum by (le) (rate(bucket[WINDOW])))``."""
    buckets: list[tuple[float, dict[float, float]]] = []
    for t, data in scrapes:
        by_le: dict[float, float] = defaultdict(float)
        for name, labels, value in data.get("messaging_process_duration_seconds", []):
            if name.endswith("_bucket"):
                by_le[float(labels["le"])] += value
        buckets.append((t, by_le))
    xs, ys = [], []
    for i, (t, now) in enumerate(buckets):
        j = i
        while j > 0 and t - buckets[j - 1][0] <= WINDOW:
            j -= 1
        if j == i:
            continue
        before = buckets[j][1]
        deltas = sorted((le, now[le] - before.get(le, 0.0)) for le in now)
        total = deltas[-1][1] if deltas else 0.0
        if total <= 0:
            continue
        rank = q * total
        lower_le, lower_count = 0.0, 0.0
        for le, count in deltas:
            if count >= rank:
                if le == float("inf"):
                    value = lower_le
                else:
                    span = count - lower_count
                    value = lower_le + (le - lower_le) * (
                        (rank - lower_count) / span if span else 0
                    )
                xs.append(t)
                ys.append(value)
                break
            lower_le, lower_count = le, count
    return xs, ys


def gauge(
    scrapes: list[tuple[float, dict[str, Any]]], family: str, by: str | None
) -> dict[str, tuple[list[float], list[float]]]:
    return {
        key: ([t for t, _ in points], [v for _, v in points])
        for key, points in series(scrapes, family, family, by).items()
    }


def draw(scrapes: list[tuple[float, dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use("dark_background")
    fig, axes = plt.subplots(4, 2, figsize=(14, 13), constrained_layout=True)
    fig.suptitle(
        "abe-resilience consumer: the dashboard's panels over a real run (scraped /metrics, "
        "drawn with matplotlib, not Grafana)",
        fontsize=11,
    )
    panels = [ax for row in axes for ax in row]
    consumed = series(
        scrapes,
        "messaging_client_consumed_messages",
        "messaging_client_consumed_messages_total",
        None,
    )
    for points in consumed.values():
        panels[0].plot(*rate(points), label="consumed")
    panels[0].set_title("Throughput (messages/s)")
    outcomes = series(
        scrapes,
        "messaging_process_duration_seconds",
        "messaging_process_duration_seconds_count",
        "resilience_outcome",
    )
    stacked = {k: rate(v) for k, v in sorted(outcomes.items())}
    if stacked:
        common = sorted({t for xs, _ in stacked.values() for t in xs})
        values = []
        for xs, ys in stacked.values():
            lookup = dict(zip(xs, ys, strict=True))
            values.append([lookup.get(t, 0.0) for t in common])
        panels[1].stackplot(common, values, labels=list(stacked), alpha=0.8)
    panels[1].set_title("Outcome mix (messages/s)")
    for key, points in series(
        scrapes, "resilience_retries", "resilience_retries_total", "error_type"
    ).items():
        panels[2].plot(*rate(points), label=key)
    panels[2].set_title("Retries (per s)")
    for key, points in series(
        scrapes,
        "resilience_dead_letters",
        "resilience_dead_letters_total",
        "resilience_dead_letter_reason",
    ).items():
        xs, ys = rate(points)
        panels[3].plot(xs, [y * 60 for y in ys], label=key)
    panels[3].set_title("Dead letters by reason (per minute)")
    for key, (xs, ys) in gauge(
        scrapes, "resilience_breaker_state", "resilience_breaker_name"
    ).items():
        panels[4].step(xs, ys, where="post", label=key)
    panels[4].set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    panels[4].set_title("Circuit breaker state")
    for q in (0.5, 0.95, 0.99):
        xs, ys = quantiles(scrapes, q)
        panels[5].plot(xs, ys, label=f"p{int(q * 100)}")
    panels[5].set_title("Processing duration percentiles (s)")
    for xs, ys in gauge(scrapes, "resilience_in_flight", None).values():
        panels[6].plot(xs, ys, label="in flight")
    panels[6].set_title("In flight")
    for xs, ys in gauge(scrapes, "resilience_broker_connected", None).values():
        panels[7].step(xs, ys, where="post", label="connected")
    panels[7].set_yticks([0, 1], ["down", "up"])
    panels[7].set_title("Broker connected")
    for ax in panels:
        ax.set_xlabel("seconds since start")
        ax.grid(alpha=0.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--rate", type=float, default=60.0, help="orders published per second")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "grafana" / "resilience-dashboard.png"
    )
    args = parser.parse_args()
    scrapes = run(args.seconds, args.rate)
    draw(scrapes, args.out)
    print(f"{len(scrapes)} scrapes; picture written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
