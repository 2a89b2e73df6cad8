"""The [telemetry] policy section, SDK detection, configure_otel and event normalisation."""

from __future__ import annotations

import enum
import importlib.util
import io
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util._once import Once

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.errors import ConfigError
from resilience.logging import LogContext
from resilience.policy import Policy
from resilience.telemetry import (
    Telemetry,
    TelemetryConfig,
    configure_otel,
    messaging_system,
    metrics_configured,
    policy_section,
    tracing_configured,
)
from resilience.telemetry.events import (
    BreakerTransition,
    EventRecorder,
    breaker_transition,
    dead_letter_attributes,
)
from resilience.telemetry.metrics import Instruments


@pytest.fixture
def clean_globals(monkeypatch: pytest.MonkeyPatch) -> None:
    """No global SDK providers; whatever a test installs is undone afterwards."""
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(metrics_internal, "_METER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(metrics_internal, "_METER_PROVIDER", None)


@pytest.fixture
def sdk(clean_globals: None) -> Iterator[None]:
    """Global SDK tracer and meter providers."""
    tracer_provider = TracerProvider()
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    otel_trace.set_tracer_provider(tracer_provider)
    otel_metrics.set_meter_provider(meter_provider)
    yield
    tracer_provider.shutdown()
    meter_provider.shutdown()


# -- parsing ---------------------------------------------------------------------------------------


def test_section_is_the_outermost_policy_section() -> None:
    """policy.py finds the section under its name, ordered first (outermost)."""
    assert policy_section.name == "telemetry"
    assert policy_section.order == 10


def test_section_defaults_and_round_trip(tmp_path: Path) -> None:
    """An empty [telemetry] table means auto; to_dict/from_dict round-trips the section."""
    policy = Policy.from_dict({"telemetry": {}})
    assert policy.sections["telemetry"] == TelemetryConfig()
    full = {
        "telemetry": {
            "enabled": True,
            "link_mode": "parent",
            "system": "redis",
            "service_name": "billing",
            "traces": False,
            "metrics": True,
            "log_context": True,
        }
    }
    parsed = Policy.from_dict(full)
    assert parsed.to_dict()["telemetry"] == full["telemetry"]
    assert Policy.from_dict(parsed.to_dict()) == parsed
    path = tmp_path / "policy.toml"
    path.write_text(parsed.to_toml())
    assert Policy.from_toml(path) == parsed


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"enabled": "yes"}, 'telemetry.enabled must be one of true, false, "auto"'),
        ({"link_mode": "child"}, "telemetry.link_mode must be one of link, parent"),
        ({"traces": "on"}, "telemetry.traces must be true or false"),
        ({"system": ""}, "telemetry.system must be a non-empty string"),
        ({"sampling": 0.5}, "unknown key in telemetry: sampling"),
    ],
)
def test_invalid_sections_are_rejected_loudly(section: dict[str, Any], message: str) -> None:
    """Wrong values and unknown keys raise a ConfigError naming the key and what is allowed."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Policy.from_dict({"telemetry": section})


def test_environment_overrides_reach_the_section() -> None:
    """RESILIENCE_TELEMETRY__ENABLED=false switches telemetry off."""
    policy = Policy.load(environ={"RESILIENCE_TELEMETRY__ENABLED": "false"})
    assert policy.sections["telemetry"].enabled is False


# -- building --------------------------------------------------------------------------------------


def test_auto_without_sdk_adds_no_layer(clean_globals: None) -> None:
    """With no SDK configured, the section contributes no middleware at all."""
    assert not tracing_configured()
    assert not metrics_configured()
    layers = Policy.from_dict({"telemetry": {}}).layers(backend=MemoryBackend.isolated())
    assert not any(isinstance(layer, Telemetry | LogContext) for layer in layers)


def test_log_context_without_sdk_adds_the_light_layer(clean_globals: None) -> None:
    """log_context = true without an SDK adds only LogContext, outermost."""
    layers = Policy.from_dict({"telemetry": {"log_context": True}}).layers()
    assert isinstance(layers[0], LogContext)
    assert not any(isinstance(layer, Telemetry) for layer in layers)


def test_disabled_adds_nothing_even_with_sdk(sdk: None) -> None:
    """enabled = false adds no telemetry layer although an SDK is configured."""
    layers = Policy.from_dict({"telemetry": {"enabled": False}}).layers()
    assert not any(isinstance(layer, Telemetry | LogContext) for layer in layers)


def test_auto_with_sdk_puts_telemetry_outermost(sdk: None) -> None:
    """With an SDK, Telemetry is the first layer and takes the system from the backend."""
    assert tracing_configured()
    assert metrics_configured()
    layers = Policy.from_dict({"telemetry": {}, "dead_letter": {"destination": "memory"}}).layers(
        backend=MemoryBackend.isolated()
    )
    telemetry = layers[0]
    assert isinstance(telemetry, Telemetry)
    assert "system='memory'" in repr(telemetry)
    assert "traces=True" in repr(telemetry)
    assert "metrics=True" in repr(telemetry)


def test_forced_on_without_sdk_uses_the_global_proxies(clean_globals: None) -> None:
    """enabled = true builds Telemetry even before an SDK is configured."""
    layers = Policy.from_dict({"telemetry": {"enabled": True, "metrics": False}}).layers()
    assert isinstance(layers[0], Telemetry)
    assert "metrics=False" in repr(layers[0])


def test_invalid_link_mode_in_code_raises() -> None:
    """Telemetry(link_mode=...) is validated like the policy."""
    with pytest.raises(ConfigError, match="link_mode must be one of link, parent"):
        Telemetry(link_mode="child", traces=False, metrics=False)
    with pytest.raises(ConfigError, match="system must be a non-empty string"):
        Telemetry(system="", traces=False, metrics=False)


def test_messaging_system_is_derived_from_the_backend() -> None:
    """messaging.system comes from the backend's class name or its messaging_system attribute."""

    class RedisBackend:
        pass

    class KafkaQueueBackend:
        pass

    class Custom:
        messaging_system = "rabbitmq"

    assert messaging_system(MemoryBackend.isolated()) == "memory"
    assert messaging_system(RedisBackend()) == "redis"
    assert messaging_system(KafkaQueueBackend()) == "kafka"
    assert messaging_system(Custom()) == "rabbitmq"
    assert messaging_system(None) == "unknown"


# -- configure_otel --------------------------------------------------------------------------------


def test_configure_otel_console_writes_spans_and_metrics_on_shutdown(clean_globals: None) -> None:
    """The console exporter prints finished spans and the final metrics when shut down."""
    out = io.StringIO()
    shutdown = configure_otel("console", "billing", out=out)
    assert tracing_configured()
    assert metrics_configured()
    with otel_trace.get_tracer("t").start_as_current_span("hello"):
        pass
    otel_metrics.get_meter("t").create_counter("demo.count").add(3)
    shutdown()
    shutdown()  # idempotent
    text = out.getvalue()
    assert '"name": "hello"' in text
    assert '"service.name": "billing"' in text
    assert "demo.count" in text


def test_configure_otel_refuses_a_second_sdk(clean_globals: None) -> None:
    """Configuring twice raises instead of silently keeping the first SDK."""
    shutdown = configure_otel("console", out=io.StringIO())
    try:
        with pytest.raises(ConfigError, match="already configured"):
            configure_otel("console", out=io.StringIO())
    finally:
        shutdown()


def test_configure_otel_rejects_unknown_exporters_and_none_is_a_no_op(clean_globals: None) -> None:
    """Unknown exporter names are refused; "none" installs nothing."""
    with pytest.raises(ConfigError, match="must be one of console, otlp, none"):
        configure_otel("jaeger")
    configure_otel("none")()
    assert not tracing_configured()


def _otlp_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(_otlp_installed(), reason="the OTLP exporter is installed")
def test_configure_otel_otlp_without_exporter_says_what_to_install(clean_globals: None) -> None:
    """--otel otlp without the exporter package fails with the pip command to run."""
    with pytest.raises(ConfigError, match="pip install opentelemetry-exporter-otlp"):
        configure_otel("otlp")
    assert not tracing_configured()


def test_configure_otel_shutdown_logs_exporter_failures(
    clean_globals: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider failing at shutdown is logged, not raised."""
    shutdown = configure_otel("console", out=io.StringIO())
    provider = otel_trace.get_tracer_provider()

    def broken() -> None:
        raise ConnectionError("collector unreachable")

    monkeypatch.setattr(provider, "force_flush", broken)
    shutdown()
    assert any("failed to flush spans" in r.getMessage() for r in caplog.records)


# -- events from other modules ---------------------------------------------------------------------


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"


@dataclass(frozen=True)
class BreakerStateChanged:
    name: str
    from_state: State
    to_state: State
    reason: str


@dataclass(frozen=True)
class BreakerOpened:
    breaker: str


@dataclass(frozen=True)
class BreakerRejected:
    name: str


def test_breaker_transitions_are_read_from_several_shapes() -> None:
    """State changes are recognised by class name and read from enum or text fields."""
    assert breaker_transition(
        BreakerStateChanged("pay", State.CLOSED, State.OPEN, "failure_rate")
    ) == BreakerTransition("pay", "open", "closed", "failure_rate")
    assert breaker_transition(BreakerOpened("pay")) == BreakerTransition("pay", "open", None)
    assert breaker_transition(
        BreakerStateChanged("pay", State.OPEN, State.FORCED_OPEN, "manual")
    ) == BreakerTransition("pay", "forced_open", "open", "manual")
    assert breaker_transition(BreakerRejected("pay")) is None
    assert breaker_transition(object()) is None


def test_dead_letter_events_are_read_and_failures_ignored() -> None:
    """DeadLettered-like events give span attributes; DeadLetterFailed-like ones do not."""

    @dataclass(frozen=True)
    class DeadLettered:
        envelope_id: str
        reason: str
        destination: str

    @dataclass(frozen=True)
    class DeadLetterFailed:
        reason: str

    assert dead_letter_attributes(DeadLettered("e1", "rejected", "sqlite")) == {
        "resilience.dead_letter.record_id": "e1",
        "resilience.dead_letter.reason": "rejected",
        "resilience.dead_letter.destination": "sqlite",
    }
    assert dead_letter_attributes(DeadLetterFailed("rejected")) is None


def test_recorder_counts_a_transition_it_did_not_hear() -> None:
    """open -> half_open by a timer nobody relayed is inferred from the next change's source."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    recorder = EventRecorder(Instruments(provider), {"messaging.system": "memory"})
    recorder(BreakerStateChanged("pay", State.CLOSED, State.OPEN, "threshold"))
    recorder(BreakerStateChanged("pay", State.HALF_OPEN, State.CLOSED, "probe_succeeded"))
    metrics_data = reader.get_metrics_data()
    assert metrics_data is not None
    data = json.loads(metrics_data.to_json())
    counts = {
        point["attributes"]["resilience.breaker.state"]: point["value"]
        for resource in data["resource_metrics"]
        for scope in resource["scope_metrics"]
        for metric in scope["metrics"]
        if metric["name"] == "resilience.breaker.transitions"
        for point in metric["data"]["data_points"]
    }
    assert counts == {"open": 1, "half_open": 1, "closed": 1}
    assert recorder.breakers == {"pay": "closed"}
    provider.shutdown()


def test_configure_otel_otlp_uses_the_installed_exporter(
    clean_globals: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an OTLP exporter importable, spans and metrics are sent through it."""
    from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    exported: list[str] = []

    class OTLPSpanExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            exported.extend(span.name for span in spans)
            return SpanExportResult.SUCCESS

    class OTLPMetricExporter(MetricExporter):
        def __init__(self) -> None:
            super().__init__(preferred_temporality={}, preferred_aggregation={})
            self.temporality = AggregationTemporality.CUMULATIVE

        def export(self, metrics_data: Any, timeout_millis: float = 0, **kwargs: Any) -> Any:
            from opentelemetry.sdk.metrics.export import MetricExportResult

            exported.append("metrics")
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 0) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 0, **kwargs: Any) -> None:
            pass

    base = "opentelemetry.exporter.otlp.proto.grpc"
    for name, attr, cls in (
        (f"{base}.trace_exporter", "OTLPSpanExporter", OTLPSpanExporter),
        (f"{base}.metric_exporter", "OTLPMetricExporter", OTLPMetricExporter),
    ):
        module = types.ModuleType(name)
        setattr(module, attr, cls)
        monkeypatch.setitem(sys.modules, name, module)
    shutdown = configure_otel("otlp", "billing")
    with otel_trace.get_tracer("t").start_as_current_span("to the collector"):
        pass
    otel_metrics.get_meter("t").create_counter("demo.count").add(1)
    shutdown()
    assert exported[0] == "to the collector"
    assert "metrics" in exported
