"""Declarative policies: dict, TOML, environment, decorator, and loud validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from resilience.errors import ConfigError
from resilience.policy import Policy, RetryConfig, resilient
from resilience.retry import DecorrelatedJitter, FullJitter, Retry, RetryBudget
from resilience.testing import zero_waits
from resilience.timeout import Timeout


def test_defaults_build_the_recommended_order() -> None:
    """The default policy is retry outside an attempt timeout."""
    layers = Policy().layers()
    assert [type(x) for x in layers] == [Retry, Timeout]
    assert layers[1].total is False  # type: ignore[attr-defined]


def test_full_policy_orders_total_timeout_outside_retry() -> None:
    """total timeout -> retry -> attempt timeout, whatever the order in the mapping."""
    policy = Policy.from_dict({"timeout": {"total": 60, "attempt": 2}, "retry": {"attempts": 5}})
    layers = policy.layers()
    assert [type(x).__name__ for x in layers] == ["Timeout", "Retry", "Timeout"]
    assert layers[0].total is True  # type: ignore[attr-defined]
    assert layers[1].attempts == 5  # type: ignore[attr-defined]


def test_backoff_choices_map_to_strategies() -> None:
    """backoff names select the matching strategy and the budget is created."""
    retry = Policy.from_dict(
        {"retry": {"backoff": "full_jitter", "budget": {"ratio": 0.1}}}
    ).layers()[0]
    assert isinstance(retry, Retry)
    assert isinstance(retry.wait, FullJitter)
    assert isinstance(retry.budget, RetryBudget)
    assert retry.budget.ratio == 0.1
    retry = Policy.from_dict({"retry": {"backoff": "decorrelated_jitter"}}).layers()[0]
    assert isinstance(retry.wait, DecorrelatedJitter)  # type: ignore[attr-defined]


def test_disabled_parts() -> None:
    """retry = false and timeouts of 0 remove those layers."""
    policy = Policy.from_dict({"retry": False, "timeout": {"attempt": 0}})
    assert policy.retry is None
    assert policy.layers() == []


def test_toml_round_trip(tmp_path: Path) -> None:
    """A policy written with to_toml() reads back equal with from_toml()."""
    policy = Policy.from_dict(
        {
            "retry": {
                "attempts": 6,
                "backoff": "fixed",
                "initial": 0.5,
                "maximum": 0.5,
                "max_elapsed": 30,
                "budget": {"ratio": 0.25, "min_per_second": 2, "window": 5},
            },
            "timeout": {"attempt": 1.5, "total": 20},
            "classify": {"terminal": ["ValueError"], "ignored": ["KeyError"]},
        }
    )
    path = tmp_path / "policy.toml"
    path.write_text(policy.to_toml())
    assert Policy.from_toml(path) == policy
    assert Policy.from_dict(policy.to_dict()) == policy


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """RESILIENCE_SECTION__KEY variables override the TOML file, parsed as JSON values."""
    path = tmp_path / "policy.toml"
    path.write_text('[retry]\nattempts = 3\nbackoff = "fixed"\n')
    policy = Policy.load(
        path,
        environ={
            "RESILIENCE_RETRY__ATTEMPTS": "7",
            "RESILIENCE_RETRY__BACKOFF": "exponential",
            "RESILIENCE_TIMEOUT__TOTAL": "12.5",
            "UNRELATED": "1",
        },
    )
    assert policy.retry == RetryConfig(attempts=7, backoff="exponential")
    assert policy.timeout.total == 12.5


def test_classify_names_resolve() -> None:
    """Exception names resolve, dotted or builtin, into the shared classifier."""
    classifier = Policy.from_dict(
        {"classify": {"terminal": ["ValueError", "json.JSONDecodeError"]}}
    ).classifier()
    assert ValueError in classifier.terminal
    import json

    assert json.JSONDecodeError in classifier.terminal


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"retry": {"attempt": 3}}, r"unknown key in retry: attempt \(allowed: .*attempts"),
        ({"retry": {"attempts": "3"}}, "retry.attempts must be an integer, got '3'"),
        ({"retry": {"attempts": 0}}, "retry.attempts must be >= 1, got 0"),
        ({"retry": {"backoff": "linear"}}, "retry.backoff must be one of fixed, exponential"),
        ({"retry": {"initial": -1}}, "retry.initial must be >= 0"),
        ({"retry": {"initial": 5, "maximum": 1}}, "retry.maximum"),
        ({"retry": {"budget": {"ratio": -0.5}}}, "retry.budget.ratio must be >= 0"),
        ({"timeout": {"attempt": "fast"}}, "timeout.attempt must be a number"),
        ({"retries": {}}, "unknown policy section: retries"),
        ({"classify": {"terminal": ["NoSuchError"]}}, "cannot import exception 'NoSuchError'"),
        ({"classify": {"terminal": ["os.path"]}}, "classify.terminal"),
        ({"retry": 3}, "retry must be a table"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    """Unknown keys, wrong types and impossible values raise a ConfigError naming them."""
    with pytest.raises(ConfigError, match=message):
        Policy.from_dict(data)


def test_missing_or_broken_toml(tmp_path: Path) -> None:
    """A missing or invalid TOML file is a one-line ConfigError."""
    with pytest.raises(ConfigError, match="not found"):
        Policy.from_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[retry\nattempts = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Policy.from_toml(bad)


async def test_resilient_decorator_retries_direct_calls() -> None:
    """A @resilient function retries when called directly and keeps its name."""
    calls = 0

    @resilient(retry={"attempts": 3, "backoff": "fixed", "initial": 10})
    async def handle_order(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("flaky")

    with zero_waits():
        await handle_order({"id": 1})
    assert calls == 3
    assert handle_order.__name__ == "handle_order"


def test_decorator_validates_at_decoration_time() -> None:
    """A bad policy in @resilient fails when the module is imported, not per message."""
    with pytest.raises(ConfigError, match=r"retry\.attempts"):

        @resilient(retry={"attempts": -1})
        async def handler(payload: dict[str, Any]) -> None:
            return None


def test_breaker_threshold_above_attempts_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    """A pause-mode breaker that opens after retries are exhausted is flagged at build time."""
    import logging

    policy = Policy.from_dict(
        {"retry": {"attempts": 3}, "circuit_breaker": {"name": "warned", "failure_threshold": 5}}
    )
    with caplog.at_level(logging.WARNING, logger="resilience.policy"):
        policy.layers()
    messages = [r.getMessage() for r in caplog.records if r.name == "resilience.policy"]
    assert len(messages) == 1
    assert messages[0].startswith("breaker_opens_after_retries_exhausted: ")
    assert "failure_threshold 5 > retry.attempts 3" in messages[0]
    caplog.clear()
    fine = Policy.from_dict(
        {"retry": {"attempts": 3}, "circuit_breaker": {"name": "fine", "failure_threshold": 3}}
    )
    with caplog.at_level(logging.WARNING, logger="resilience.policy"):
        fine.layers()
    assert not [r for r in caplog.records if r.name == "resilience.policy"]
