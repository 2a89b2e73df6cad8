"""``resilience run MODULE:HANDLER``: a production consumer on the configured backend."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from resilience.cli import CliError
from resilience.cli._common import import_handler, load_policy, setup_otel
from resilience.cli._startup import load_queue_backend, startup_fields
from resilience.errors import ConfigError
from resilience.ops.connect import BrokerUnreachable, await_broker, connection_of
from resilience.ops.service import Service
from resilience.policy import Policy
from resilience.telemetry.setup import metrics_configured

if TYPE_CHECKING:
    from resilience.ops.http import HttpEndpoint
    from resilience.prometheus import PrometheusMetrics

log = logging.getLogger("resilience.cli.run")


def register(subparsers: Any) -> None:
    """Add the ``run`` sub-command."""
    parser = subparsers.add_parser(
        "run",
        help="run a handler as a resilient consumer on the configured backend",
        description="Consume from load_backend()'s backend (QUEUE_BACKEND picks a provider) and "
        "run every message through the policy around HANDLER. SIGINT/SIGTERM drain and stop "
        "(exit code 0 after a clean drain, 3 when the drain timed out: the messages still in "
        "flight were released for redelivery); SIGHUP reads the policy file again. Startup "
        "failures (no backend configured, a broker that refuses or does not answer) exit with "
        "code 2 and one line.",
    )
    parser.add_argument("handler", metavar="MODULE:HANDLER", help="async def handler(payload)")
    parser.add_argument(
        "--policy", metavar="FILE", help="TOML policy file (RESILIENCE_* env vars override it)"
    )
    parser.add_argument("--group", metavar="NAME", help="consumer group")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="messages in flight (default 1: keeps order)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long shutdown lets in-flight messages finish (default 30)",
    )
    parser.add_argument(
        "--max-messages", type=int, metavar="N", help="stop gracefully after N messages are settled"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long startup waits for the broker before exiting with code 2 (default 30; "
        "0: wait forever); outages after startup are waited out with warnings",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="consume the in-process memory backend (development only; same as "
        "QUEUE_BACKEND=memory): without QUEUE_BACKEND the command refuses it",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve /healthz, /readyz, /metrics (Prometheus), /breakers and /policy/reload on "
        "this address (off by default; an admin surface: keep it on loopback or a private "
        "network; port 0 picks a free one)",
    )
    parser.add_argument("--otel", choices=("console", "otlp"), help="export traces and metrics")
    parser.add_argument(
        "--service-name",
        help="service name for telemetry (default: telemetry.service_name, else resilience)",
    )
    parser.add_argument(
        "--log-context",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="put message id, key and attempt in every log line inside the pipeline, even "
        "without OpenTelemetry (default: on; its cost is in benchmarks/README.md)",
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="log lines: json for production, console for people (auto: console on a terminal)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="least important log lines shown (default info; debug adds tracebacks of failures "
        "that are reported in one line)",
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise CliError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.max_messages is not None and args.max_messages < 0:
        raise CliError(f"--max-messages must be >= 0, got {args.max_messages}")
    if not args.connect_timeout >= 0:
        raise CliError(f"--connect-timeout must be >= 0 seconds, got {args.connect_timeout}")
    address = None
    if args.http:
        from resilience.ops.http import EndpointError, parse_address

        try:
            address = parse_address(args.http)
        except EndpointError as exc:
            raise CliError(str(exc)) from None
    handler = import_handler(args.handler)
    policy = load_policy(args.policy)
    if args.log_context:
        policy = _with_log_context(policy)
    from resilience.logging import configure_logging

    configure_logging(args.log_format, level=args.log_level.upper())
    service_name = args.service_name
    telemetry = policy.sections.get("telemetry")
    if service_name is None:
        service_name = getattr(telemetry, "service_name", None) or "resilience"
    metrics = _prometheus() if address is not None else None
    shutdown_otel = setup_otel(
        args.otel, service_name, metric_readers=[metrics.reader] if metrics is not None else []
    )
    holder: list[Service] = []  # keeps the consumers alive until the final metric export
    try:
        return asyncio.run(_serve(args, handler, policy, address, metrics, holder))
    finally:
        shutdown_otel()
        holder.clear()


def _prometheus() -> PrometheusMetrics:
    try:
        from resilience.prometheus import prometheus_metrics

        return prometheus_metrics()
    except ImportError as exc:
        raise CliError(f"--http: {exc}") from None


def _with_log_context(policy: Policy) -> Policy:
    """``policy`` with ``telemetry.log_context`` on (the command's default)."""
    sections = dict(policy.sections)
    telemetry = sections.get("telemetry")
    if telemetry is None:
        telemetry = Policy.from_dict({"telemetry": {}}).sections["telemetry"]
    sections["telemetry"] = dataclasses.replace(telemetry, log_context=True)
    return dataclasses.replace(policy, sections=sections)


_MEMORY_REFUSAL = (
    "no message-queue backend is configured: set QUEUE_BACKEND (for example "
    "QUEUE_BACKEND=redis with REDIS_URL); the in-process memory fallback is used only when "
    "asked for (QUEUE_BACKEND=memory or --memory), as nothing outside this process can "
    "publish to it"
)


async def _serve(
    args: argparse.Namespace,
    handler: Any,
    policy: Policy,
    address: tuple[str, int] | None,
    metrics: PrometheusMetrics | None,
    holder: list[Service],
) -> int:
    from resilience.consumer import ResilientConsumer
    from resilience.policy import policy_of

    backend = load_queue_backend(allow_memory=args.memory, refusal=_MEMORY_REFUSAL)
    decorated, _ = policy_of(handler)

    def make_consumer(chosen: Policy | None) -> ResilientConsumer:
        return ResilientConsumer(
            backend,
            args.group,
            policy=chosen,
            concurrency=args.concurrency,
            drain_timeout=args.drain_timeout,
        )

    service = Service(
        backend,
        handler,
        None if decorated is not None else policy,
        make_consumer,
        None if decorated is not None else _reloader(args),
    )
    holder.append(service)
    endpoint: HttpEndpoint | None = None
    if address is not None:
        from resilience.ops.http import EndpointError, HttpEndpoint

        endpoint = HttpEndpoint(service, metrics)
        try:
            await endpoint.start(*address)  # before consuming: a busy port consumes nothing
        except EndpointError as exc:
            await _close(backend)
            raise CliError(str(exc)) from None
    try:
        run_task = service.start()
    except ConfigError as exc:
        if endpoint is not None:
            await endpoint.stop()
        await _close(backend)
        raise CliError(str(exc)) from None
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop_requested.set()
        if signals > 1 and service.consumer is not None:
            log.warning("second signal: stopping without waiting for the drain")
            service.consumer.drain_timeout = 0.0

    reloads: set[asyncio.Task[Any]] = set()

    def on_hangup() -> None:
        task = asyncio.create_task(service.reload("SIGHUP"))
        reloads.add(task)  # a strong reference until it is done
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    helpers: list[asyncio.Task[Any]] = [asyncio.create_task(stop_requested.wait())]
    if args.max_messages is not None:
        helpers.append(asyncio.create_task(service.outcomes.wait_for(args.max_messages)))
    try:
        status = connection_of(backend)
        if status is not None and metrics_configured():
            _watch(backend, status)
        await await_broker(backend, run_task, stop_requested, args.connect_timeout)
        if not run_task.done():
            fields = startup_fields(
                backend,
                group=args.group,
                concurrency=args.concurrency,
                policy=service.policy if decorated is None else None,
                http=endpoint.address if endpoint is not None else None,
            )
            log.info("resilience run started", extra=fields)
        while True:
            run_task = service.run_task or run_task
            done, _ = await asyncio.wait({run_task, *helpers}, return_when=asyncio.FIRST_COMPLETED)
            if run_task in done and (service.reloading or service.run_task is not run_task):
                await service.reloaded()  # the old consumer drained for a reload: go on
                continue
            break
        await service.reloaded()  # a reload in progress finishes before the stop
        run_task = service.run_task or run_task
        if not run_task.done():
            log.info("stopping: draining in-flight messages")
            await service.stop()
        try:
            await run_task
        except asyncio.CancelledError:
            pass
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        except Exception as exc:
            # The backend gave up (wrong credentials, a broker that refuses): one line, exit 2;
            # the traceback only for those who ask for debug logs.
            log.debug("the consumer stopped", exc_info=exc)
            raise CliError(f"the consumer stopped: {type(exc).__name__}: {exc}") from None
    except BrokerUnreachable as exc:
        await _stop(service)
        raise CliError(str(exc)) from None
    finally:
        for helper in helpers:
            helper.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
                loop.remove_signal_handler(sig)
        if endpoint is not None:
            await endpoint.stop()
        await _close(backend)
    outcomes = service.outcomes
    counts = ", ".join(
        f"{o.value} {n}" for o, n in sorted(outcomes.counts.items(), key=lambda x: x[0].value)
    )
    print(
        f"resilience run: settled {outcomes.total} message(s){': ' + counts if counts else ''}",
        file=sys.stderr,
    )
    consumer = service.consumer
    return 3 if consumer is not None and consumer.drain_timed_out else 0


def _reloader(args: argparse.Namespace) -> Any:
    """Reads the policy file again, as at startup (``ConfigError`` when it is invalid)."""

    def load() -> Policy:
        policy = Policy.load(args.policy)
        return _with_log_context(policy) if args.log_context else policy

    return load


def _watch(backend: Any, status: Any) -> None:
    from opentelemetry import metrics as otel_metrics

    from resilience.broker_gauge import watch_connection
    from resilience.telemetry.setup import messaging_system

    provider: Any = otel_metrics.get_meter_provider()
    watch_connection(provider, status, {"messaging.system": messaging_system(backend)})


async def _stop(service: Service) -> None:
    """Stop a consumer that never reached its broker (nothing was consumed)."""
    if service.consumer is not None:
        service.consumer.drain_timeout = 0.0
    await service.stop()
    if service.run_task is not None:
        with contextlib.suppress(BaseException):
            await service.run_task


async def _close(backend: Any) -> None:
    closer = getattr(backend, "aclose", None) or getattr(backend, "close", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            result = closer()
            if asyncio.iscoroutine(result):
                await result
