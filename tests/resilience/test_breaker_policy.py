"""The ``[circuit_breaker]`` policy section: parsing, round trips, env overrides, building."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from resilience.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitBreakerConfig,
    CountWindow,
    TimeWindow,
    default_registry,
    policy_section,
)
from resilience.clock import FakeClock
from resilience.delivery import Delivery
from resilience.errors import ConfigError
from resilience.events import EventBus
from resilience.policy import ORDER_CIRCUIT_BREAKER, SECTION_MODULES, Policy
from resilience.retry import Retry
from resilience.timeout import Timeout

pytestmark = pytest.mark.timeout(20)

FULL: dict[str, Any] = {
    "name": "payments",
    "mode": "fail_fast",
    "failure_threshold": 4,
    "window": {"type": "time", "size": 30, "minimum_calls": 8, "buckets": 6},
    "failure_rate": 0.4,
    "slow_call_duration": 1.5,
    "slow_call_rate": 0.9,
    "open_wait": 2,
    "open_wait_multiplier": 3,
    "open_wait_max": 120,
    "half_open_probes": 2,
}


def test_section_is_registered_with_its_order() -> None:
    """The policy finds this module's section under circuit_breaker, placed inside retry."""
    assert SECTION_MODULES["circuit_breaker"] == "resilience.breaker"
    assert policy_section.name == "circuit_breaker"
    assert policy_section.order == ORDER_CIRCUIT_BREAKER == 50


def test_every_key_is_parsed() -> None:
    """Each documented key lands in the frozen config."""
    config = Policy.from_dict({"circuit_breaker": FULL}).sections["circuit_breaker"]
    assert config == CircuitBreakerConfig(
        name="payments",
        mode="fail_fast",
        breaker=BreakerConfig(
            failure_threshold=4,
            window=TimeWindow(size=30.0, minimum_calls=8, buckets=6),
            failure_rate=0.4,
            slow_call_duration=1.5,
            slow_call_rate=0.9,
            open_wait=2.0,
            open_wait_multiplier=3.0,
            open_wait_max=120.0,
            half_open_probes=2,
        ),
    )


def test_an_empty_section_gives_the_defaults() -> None:
    """``[circuit_breaker]`` with no keys is a pause-mode breaker named default."""
    config = Policy.from_dict({"circuit_breaker": {}}).sections["circuit_breaker"]
    assert config == CircuitBreakerConfig()
    assert config.breaker.failure_threshold == 3  # composes with the retry default of 3 attempts
    assert Policy.from_dict({"circuit_breaker": False}).sections == {}


@pytest.mark.parametrize(
    "section",
    [
        FULL,
        {},
        {"failure_threshold": 0, "window": {"size": 20}},
        {"window": {"type": "count", "size": 50, "minimum_calls": 50}, "failure_rate": 1},
    ],
)
def test_dict_and_toml_round_trips(section: dict[str, Any], tmp_path: Path) -> None:
    """to_dict and to_toml read back to an equal policy."""
    policy = Policy.from_dict({"circuit_breaker": section})
    assert Policy.from_dict(policy.to_dict()) == policy
    path = tmp_path / "policy.toml"
    path.write_text(policy.to_toml())
    assert Policy.from_toml(path) == policy


def test_environment_overrides_nested_keys(tmp_path: Path) -> None:
    """RESILIENCE_CIRCUIT_BREAKER__WINDOW__SIZE and friends override the file's values."""
    path = tmp_path / "policy.toml"
    path.write_text(
        '[circuit_breaker]\nname = "from-file"\nhalf_open_probes = 3\n'
        'window = { type = "count", size = 10 }\n'
    )
    policy = Policy.load(
        path,
        environ={
            "RESILIENCE_CIRCUIT_BREAKER__NAME": "orders-db",
            "RESILIENCE_CIRCUIT_BREAKER__WINDOW__SIZE": "40",
            "RESILIENCE_CIRCUIT_BREAKER__FAILURE_RATE": "0.25",
            "RESILIENCE_CIRCUIT_BREAKER__MODE": "fail_fast",
        },
    )
    config = policy.sections["circuit_breaker"]
    assert config.name == "orders-db"
    assert config.mode == "fail_fast"
    assert config.breaker.window == CountWindow(size=40)
    assert config.breaker.failure_rate == 0.25
    assert config.breaker.half_open_probes == 3


def test_failure_threshold_false_turns_it_off() -> None:
    """``failure_threshold = false`` (or 0) leaves only the window's conditions."""
    data = {"circuit_breaker": {"failure_threshold": False, "window": {"size": 10}}}
    config = Policy.from_dict(data).sections["circuit_breaker"]
    assert config.breaker.failure_threshold is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"treshold": 3},
            r"unknown key in circuit_breaker: treshold \(allowed: .*failure_threshold",
        ),
        ({"mode": "hold"}, "circuit_breaker.mode must be one of pause, fail_fast; got 'hold'"),
        ({"window": {"type": "sliding"}}, "circuit_breaker.window.type must be one of count, time"),
        ({"window": {"size": 10, "buckets": 2}}, r"unknown key in circuit_breaker.window: buckets"),
        ({"window": {"size": 0}}, "circuit_breaker.window.size must be >= 1"),
        ({"failure_rate": 0.5}, "circuit_breaker: failure_rate needs a window"),
        ({"failure_threshold": 0}, "circuit_breaker: the breaker has no trip condition"),
        ({"failure_threshold": "5"}, "circuit_breaker.failure_threshold must be an integer"),
        ({"open_wait": -1}, "circuit_breaker.open_wait must be > 0"),
        ({"open_wait_multiplier": 0.5}, "circuit_breaker.open_wait_multiplier must be >= 1"),
        ({"half_open_probes": 0}, "circuit_breaker.half_open_probes must be >= 1"),
        ({"name": ""}, "circuit_breaker.name must be a non-empty string"),
        ({"window": {"size": 10}, "failure_rate": 2}, r"failure_rate must be a fraction"),
        ({"window": 5}, "circuit_breaker.window must be a table"),
    ],
)
def test_invalid_sections_name_the_key(section: dict[str, Any], message: str) -> None:
    """Every mistake raises ConfigError naming the key, the value or the choices."""
    with pytest.raises(ConfigError, match=message):
        Policy.from_dict({"circuit_breaker": section})


def test_middleware_sits_between_retry_and_the_attempt_timeout() -> None:
    """The built pipeline has the breaker inside retry and outside the per-attempt timeout."""
    clock = FakeClock()
    policy = Policy.from_dict({"circuit_breaker": {"name": "order-check"}})
    layers = policy.layers(clock=clock)
    kinds = [type(layer) for layer in layers]
    assert kinds == [Retry, CircuitBreaker, Timeout]
    breaker = layers[1]
    assert isinstance(breaker, CircuitBreaker)
    assert breaker.mode == "pause"
    assert breaker.breaker.clock is clock
    assert breaker.classifier == policy.classifier()


async def test_policies_naming_one_breaker_share_it() -> None:
    """Two handlers whose policies name the same breaker trip and recover together."""
    clock = FakeClock()
    section = {"name": "shared-dep", "failure_threshold": 2, "mode": "fail_fast"}
    first = Policy.from_dict({"retry": False, "circuit_breaker": section}).layers(clock=clock)[0]
    second = Policy.from_dict({"retry": False, "circuit_breaker": section}).layers(clock=clock)[0]
    assert isinstance(first, CircuitBreaker)
    assert isinstance(second, CircuitBreaker)
    assert first.breaker is second.breaker is default_registry.find("shared-dep", clock=clock)

    async def down(delivery: Delivery) -> None:
        raise ConnectionError("down")

    for layer in (first, second):
        with pytest.raises(ConnectionError):
            await layer(Delivery({}), down)
    assert second.state is BreakerState.OPEN
    default_registry.remove("shared-dep", clock=clock)


def test_conflicting_policies_for_one_name_fail_at_build() -> None:
    """Two policies giving one breaker name different settings cannot both be built."""
    clock = FakeClock()
    Policy.from_dict({"circuit_breaker": {"name": "clash", "failure_threshold": 2}}).layers(
        clock=clock
    )
    other = Policy.from_dict({"circuit_breaker": {"name": "clash", "failure_threshold": 3}})
    with pytest.raises(ConfigError, match="'clash' already exists"):
        other.layers(clock=clock)
    default_registry.remove("clash", clock=clock)


async def test_the_consumer_bus_receives_every_state_change() -> None:
    """A breaker built from a policy forwards its changes to the consumer's event bus."""
    clock = FakeClock()
    seen: list[object] = []
    bus = EventBus(seen.append)
    policy = Policy.from_dict(
        {"retry": False, "circuit_breaker": {"name": "bus-dep", "failure_threshold": 1}}
    )
    layer = policy.layers(clock=clock, events=bus)[0]
    assert isinstance(layer, CircuitBreaker)
    layer.force_open()
    layer.reset()
    assert [getattr(e, "to_state", None) for e in seen] == [
        BreakerState.FORCED_OPEN,
        BreakerState.CLOSED,
    ]
    default_registry.remove("bus-dep", clock=clock)
