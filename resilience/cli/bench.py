"""``resilience bench policies | overhead | memory | redis``: the benchmarks.

The engines live in :mod:`resilience.bench` (installed with the package, so the command works
from any directory); the scripts in the repository's ``benchmarks/`` folder call this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from resilience.cli import CliError
from resilience.errors import ConfigError

__all__ = ["register"]

_DEFAULT_SCENARIOS = ("transient", "outage", "poison", "latency", "rate_limited")


def register(subparsers: Any) -> None:
    """Add the ``bench`` command and its sub-commands."""
    parser = subparsers.add_parser(
        "bench",
        help="compare policies under simulated faults; measure overhead and throughput",
        description="Benchmarks. 'policies' compares resilience policies against simulated "
        "faulty dependencies on virtual time; 'overhead' measures the per-message cost against "
        "the bare consumer and peer libraries; 'memory' checks memory stays flat; 'redis' "
        "and 'brokers' measure broker throughput.",
    )
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    _register_policies(sub)
    _register_overhead(sub)
    _register_memory(sub)
    _register_redis(sub)
    _register_brokers(sub)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _common_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON ('-': only JSON, stdout)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def _emit(args: argparse.Namespace, text: str, document: dict[str, Any]) -> None:
    if args.json == "-":
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2)
            fh.write("\n")
        print(f"JSON written to {args.json}")


# -- policies ------------------------------------------------------------------------------------


def _register_policies(sub: Any) -> None:
    parser = sub.add_parser(
        "policies",
        help="compare policies against simulated faults (virtual time, deterministic)",
        description="Run every policy against every scenario on virtual time and report "
        "succeeded / dead-lettered / lost messages, load amplification, latency percentiles, "
        "drain time after recovery and breaker open time. The same seed gives the same numbers.",
    )
    parser.add_argument(
        "--policy",
        action="append",
        metavar="SPEC",
        help="built-in name, a TOML policy file (as 'resilience run --policy' takes) or "
        "NAME=FILE.toml; repeatable (default: the built-ins)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="SPEC",
        help="NAME[:key=value,...] or package.module:Class[:key=value,...]; repeatable "
        f"(default: {', '.join(_DEFAULT_SCENARIOS)})",
    )
    parser.add_argument("--messages", type=_positive_int, default=10_000, metavar="N")
    parser.add_argument(
        "--rate", type=_positive_float, default=2.0, metavar="PER_SECOND", help="arrival rate"
    )
    parser.add_argument("--concurrency", type=_positive_int, default=8, metavar="N")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--horizon",
        type=_positive_float,
        default=6 * 3600.0,
        metavar="SECONDS",
        help="simulated time after the last arrival before a run gives up (default 6 h)",
    )
    parser.add_argument("--chart", metavar="PATH.png", help="draw a PNG chart (needs matplotlib)")
    parser.add_argument("--list", action="store_true", help="list built-in policies and scenarios")
    parser.add_argument("--verbose", action="store_true", help="keep per-message log lines")
    _common_output(parser)
    parser.set_defaults(func=_policies)


def _list() -> int:
    from resilience.bench.policies import builtin_policies
    from resilience.bench.scenarios import SCENARIOS

    print("policies (built in):")
    for name, named in builtin_policies().items():
        print(f"  {name:22} {named.description}")
    print("scenarios (built in):")
    for name, cls in SCENARIOS.items():
        params = ", ".join(f"{k}={v}" for k, v in cls().params().items())
        print(f"  {name:22} {cls.summary} ({params})")
    return 0


def _policies(args: argparse.Namespace) -> int:
    from resilience.bench.policies import DEFAULT_POLICIES, builtin_policies, load_policy
    from resilience.bench.report import (
        ProgressBar,
        comparison_document,
        format_comparison,
        write_chart,
    )
    from resilience.bench.scenarios import parse_scenario
    from resilience.bench.simulate import Workload, compare

    if args.list:
        return _list()
    try:
        specs: Sequence[str] = args.policy or [
            name for name in DEFAULT_POLICIES if name in builtin_policies()
        ]
        policies = [load_policy(spec) for spec in specs]
        scenarios = [parse_scenario(spec) for spec in args.scenario or _DEFAULT_SCENARIOS]
        workload = Workload(
            messages=args.messages,
            rate=args.rate,
            concurrency=args.concurrency,
            seed=args.seed,
            horizon=args.horizon,
        )
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    from resilience.bench.scenarios import scenario_name

    for kind, names in (
        ("policy", [p.name for p in policies]),
        ("scenario", [scenario_name(s) for s in scenarios]),
    ):
        if len(set(names)) != len(names):
            raise CliError(f"{kind} names must be unique, got {', '.join(names)}")
    if args.chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError(
                "--chart needs matplotlib: pip install 'abe-resilience[charts]'"
            ) from None
    bar = ProgressBar(enabled=args.progress)
    results = compare(policies, scenarios, workload, progress=bar, verbose=args.verbose)
    text = format_comparison(results, scenarios, workload)
    _emit(args, text, comparison_document(results, policies, scenarios, workload))
    if args.chart:
        path = write_chart(results, args.chart)
        print(f"chart written to {path}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


# -- overhead, memory, redis -----------------------------------------------------------------------


def _register_overhead(sub: Any) -> None:
    parser = sub.add_parser(
        "overhead",
        help="per-message cost of the pipeline against the bare consumer and peer libraries",
        description="Measure the success-path cost per message of the bare AsyncLoopConsumer, "
        "ResilientConsumer with the full default pipeline (and with telemetry), and the same "
        "handler wrapped by tenacity, stamina and a peer circuit breaker; all ratios come from "
        "the same run.",
    )
    parser.add_argument("--messages", type=_positive_int, default=100_000, metavar="N")
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=5,
        help="interleaved repetitions (the median counts)",
    )
    _common_output(parser)
    parser.set_defaults(func=_overhead)


def _overhead(args: argparse.Namespace) -> int:
    from resilience.bench.overhead import format_overhead, measure_overhead
    from resilience.bench.report import ProgressBar

    bar = ProgressBar(enabled=args.progress)
    report = measure_overhead(messages=args.messages, rounds=args.rounds, progress=bar)
    _emit(args, format_overhead(report), report)
    return 0


def _register_memory(sub: Any) -> None:
    parser = sub.add_parser(
        "memory",
        help="resident memory growth over many messages through the full pipeline",
    )
    parser.add_argument("--messages", type=_positive_int, default=1_000_000, metavar="N")
    parser.add_argument(
        "--batch", type=_positive_int, default=10_000, metavar="N", help="messages per batch"
    )
    _common_output(parser)
    parser.set_defaults(func=_memory)


def _memory(args: argparse.Namespace) -> int:
    from resilience.bench.memory import format_memory, measure_memory
    from resilience.bench.report import ProgressBar

    bar = ProgressBar(enabled=args.progress)
    report = measure_memory(messages=args.messages, batch=args.batch, progress=bar)
    _emit(args, format_memory(report), report)
    return 0


def _register_redis(sub: Any) -> None:
    parser = sub.add_parser(
        "redis",
        help="messages/s draining a Redis stream: ResilientConsumer vs hand-written loops",
    )
    parser.add_argument(
        "--url",
        help="Redis URL (default: REDIS_URL, else a temporary redis-server when one is "
        "installed, else redis://127.0.0.1:6379/0)",
    )
    parser.add_argument("--messages", type=_positive_int, default=100_000, metavar="N")
    parser.add_argument(
        "--rounds", type=_positive_int, default=3, help="repetitions per contender (best kept)"
    )
    _common_output(parser)
    parser.set_defaults(func=_redis)


def _redis(args: argparse.Namespace) -> int:
    from resilience.bench.redis_throughput import (
        RedisUnavailable,
        format_throughput,
        measure_throughput,
    )
    from resilience.bench.report import ProgressBar

    bar = ProgressBar(enabled=args.progress)
    try:
        report = measure_throughput(
            url=args.url, messages=args.messages, rounds=args.rounds, progress=bar
        )
    except RedisUnavailable as exc:
        raise CliError(str(exc)) from None
    _emit(args, format_throughput(report), report)
    return 0


# -- brokers -------------------------------------------------------------------------------------


def _register_brokers(sub: Any) -> None:
    from resilience.bench.broker_throughput import BROKERS

    parser = sub.add_parser(
        "brokers",
        help="messages/s draining Redis, RabbitMQ and NATS: the full pipeline vs a "
        "hand-written loop per client, in one run ('redis' is the Redis part alone)",
    )
    parser.add_argument(
        "--broker",
        action="append",
        choices=BROKERS,
        metavar="NAME",
        help=f"measure only this broker (repeatable; one of {', '.join(BROKERS)}; default all)",
    )
    parser.add_argument("--redis-url", metavar="URL", help="as 'bench redis --url'")
    parser.add_argument(
        "--rabbitmq-url", metavar="URL", help="default amqp://guest:guest@127.0.0.1:5672/"
    )
    parser.add_argument("--nats-url", metavar="URL", help="default nats://127.0.0.1:4222")
    parser.add_argument(
        "--messages",
        type=_positive_int,
        default=100_000,
        metavar="N",
        help="messages per drain (default 100000)",
    )
    parser.add_argument(
        "--rounds", type=_positive_int, default=3, help="repetitions per contender (best kept)"
    )
    _common_output(parser)
    parser.set_defaults(func=_brokers)


def _brokers(args: argparse.Namespace) -> int:
    from resilience.bench.broker_throughput import BROKERS, format_brokers, measure_brokers
    from resilience.bench.report import ProgressBar

    bar = ProgressBar(enabled=args.progress)
    urls = {
        name: url
        for name, url in (
            ("redis", args.redis_url),
            ("rabbitmq", args.rabbitmq_url),
            ("nats", args.nats_url),
        )
        if url
    }
    report = measure_brokers(
        brokers=tuple(dict.fromkeys(args.broker or BROKERS)),
        urls=urls,
        messages=args.messages,
        rounds=args.rounds,
        progress=bar,
    )
    _emit(args, format_brokers(report), report)
    if not report["brokers"]:
        raise CliError("no broker answered: " + "; ".join(report["unavailable"].values()))
    return 0
