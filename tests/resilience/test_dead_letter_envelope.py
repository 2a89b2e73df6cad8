"""The dlq.v1 envelope: contents, redaction at any depth, size caps, JSON safety."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from abe.backends.message_queue.base.extensions import InboundMessage
from resilience.dead_letter import (
    MASK,
    REPLAY_COUNT_HEADER,
    SCHEMA,
    EnvelopeBuilder,
    EnvelopeOptions,
    Redactor,
)
from resilience.dead_letter.envelope import envelope_size, replay_count_of
from resilience.delivery import Delivery
from resilience.errors import ConfigError

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def failed(exc_factory: Any) -> BaseException:
    """Raise and catch an exception so that it carries a traceback."""
    try:
        exc_factory()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def boom(message: str = "boom") -> None:
    raise ConnectionError(message)


def build(
    payload: dict[str, Any],
    exc: BaseException,
    *,
    headers: dict[str, str] | None = None,
    options: EnvelopeOptions | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    delivery = Delivery(payload, key="orders", message_id="7", group="g", headers=headers)
    builder = EnvelopeBuilder(options, system="memory", handler_name="app.handle")
    return builder.build(delivery, exc, reason="non_retryable", stage="handle", monotonic_now=0.0)


def test_envelope_has_every_documented_part() -> None:
    """An envelope holds schema, payload, headers, source, error, attempts, origin and trace."""
    exc = failed(boom)
    env = build({"n": 1}, exc, headers={"traceparent": TRACEPARENT, "x-tenant": "a"})
    assert env["schema"] == SCHEMA
    assert len(env["id"]) == 32
    assert env["payload"] == {"n": 1}
    assert env["headers"] == {"traceparent": TRACEPARENT, "x-tenant": "a"}
    assert env["source"]["system"] == "memory"
    assert env["source"]["key"] == "orders"
    assert env["source"]["group"] == "g"
    assert env["source"]["message_id"] == "7"
    assert env["error"]["reason"] == "non_retryable"
    assert env["error"]["stage"] == "handle"
    assert env["error"]["type"] == "ConnectionError"
    assert env["error"]["message"] == "boom"
    assert "in boom" in env["error"]["traceback"]
    assert env["origin"]["handler"] == "app.handle"
    assert env["origin"]["host"]
    assert env["trace"]["original"]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert env["trace"]["processing"] is None
    assert env["replay_count"] == 0
    assert env["redacted"] == []
    assert env["truncated"] == []
    json.dumps(env)  # serialisable as is


def test_envelope_records_the_cause_type_with_its_module() -> None:
    """The cause's dotted type is recorded for ``raise X from Y``."""

    def chained() -> None:
        try:
            raise json.JSONDecodeError("bad", "doc", 0)
        except ValueError as exc:
            raise ConfigError("wrapped") from exc

    env = build({}, failed(chained))
    assert env["error"]["type"] == "resilience.errors.ConfigError"
    assert env["error"]["cause_type"] == "json.decoder.JSONDecodeError"


def test_replay_count_comes_from_the_header() -> None:
    """The replay count is read from x-replay-count, and junk reads as 0."""
    assert replay_count_of({REPLAY_COUNT_HEADER: "2"}) == 2
    assert replay_count_of({REPLAY_COUNT_HEADER: "junk"}) == 0
    assert replay_count_of({}) == 0
    env = build({}, failed(boom), headers={REPLAY_COUNT_HEADER: "3"})
    assert env["replay_count"] == 3


def test_redaction_masks_configured_fields_at_any_depth() -> None:
    """Configured fields are masked in nested dicts and lists, whatever their case or dashes."""
    payload: dict[str, Any] = {
        "order": {"id": 1, "customer": {"Password": "hunter22", "name": "Ann"}},
        "items": [{"sku": "a"}, {"api-key": "k-123456"}],
        "token": {"nested": "whole subtree"},
    }
    env = build(
        payload,
        failed(lambda: boom("login failed for hunter22 with k-123456")),
        headers={"Authorization": "Bearer abcdef", "traceparent": TRACEPARENT},
    )
    assert env["payload"]["order"]["customer"] == {"Password": MASK, "name": "Ann"}
    assert env["payload"]["items"] == [{"sku": "a"}, {"api-key": MASK}]
    assert env["payload"]["token"] == MASK
    assert env["headers"] == {"Authorization": MASK, "traceparent": TRACEPARENT}
    assert sorted(env["redacted"]) == [
        "headers.Authorization",
        "payload.items[1].api-key",
        "payload.order.customer.Password",
        "payload.token",
    ]
    assert "hunter22" not in json.dumps(env)
    assert "k-123456" not in json.dumps(env)
    assert env["error"]["message"] == f"login failed for {MASK} with {MASK}"
    assert payload["order"]["customer"]["Password"] == "hunter22"  # the input is left alone


def test_redaction_can_be_turned_off() -> None:
    """With an empty redact list nothing is masked."""
    env = build({"password": "x"}, failed(boom), options=EnvelopeOptions(redact=()))
    assert env["payload"] == {"password": "x"}
    assert env["redacted"] == []


def test_redactor_turns_odd_values_into_json() -> None:
    """Values JSON cannot hold become strings, lists or base64, so the envelope serialises."""
    redactor = Redactor(())
    value = {
        1: dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
        "b": b"\xff\x00",
        "u": b"text",
        "t": (1, {2}),
        "o": object(),
    }
    out, paths, secrets = redactor.redact(value)
    assert (paths, secrets) == ([], set())
    json.dumps(out)
    assert out["1"].startswith("datetime.datetime(2026, 1, 2")
    assert out["b"] == "/wA="
    assert out["u"] == "text"
    assert out["t"] == [1, [2]]


def recurse(n: int) -> None:
    """Fail ``n`` frames deep, alternating two functions (so no frames are folded)."""
    if n == 0:
        raise RecursionError("deep")
    _recurse_again(n - 1)


def _recurse_again(n: int) -> None:
    recurse(n)


def test_traceback_keeps_only_the_innermost_frames() -> None:
    """The traceback is capped at max_traceback_frames, keeping the frames nearest the error."""
    exc = failed(lambda: recurse(40))
    env = build({}, exc, options=EnvelopeOptions(max_traceback_frames=5))
    tb = env["error"]["traceback"]
    assert tb.count('File "') == 5
    assert tb.count("in _recurse_again") == 2
    assert "RecursionError: deep" in tb
    assert "traceback" in env["truncated"]


def test_traceback_bytes_are_capped_keeping_the_end() -> None:
    """A traceback over max_traceback_bytes keeps its end and says how much it dropped."""
    exc = failed(lambda: recurse(60))
    env = build({}, exc, options=EnvelopeOptions(max_traceback_frames=100, max_traceback_bytes=600))
    tb = env["error"]["traceback"]
    assert len(tb.encode()) <= 600
    assert tb.startswith("[traceback truncated:")
    assert tb.rstrip().endswith("RecursionError: deep")


def test_long_messages_are_truncated() -> None:
    """An exception message over max_message_chars is cut and flagged."""
    options = EnvelopeOptions(max_message_chars=100)
    env = build({}, failed(lambda: boom("x" * 5000)), options=options)
    assert len(env["error"]["message"]) < 130
    assert "message" in env["truncated"]


def test_envelope_size_cap_cuts_the_payload_last() -> None:
    """A huge payload is replaced by a preview so that the whole envelope fits the cap."""
    payload = {"blob": "y" * 200_000, "n": 1}
    options = EnvelopeOptions(max_envelope_bytes=8192)
    env = build(payload, failed(lambda: recurse(30)), options=options)
    assert envelope_size(env) <= 8192
    assert env["payload"] is None
    assert env["payload_preview"].startswith('{"blob":"yyy')
    assert "payload" in env["truncated"]
    assert env["error"]["type"] == "RecursionError"


def test_envelope_size_cap_counts_bytes_of_non_ascii_payloads() -> None:
    """A payload of multi-byte characters is cut by bytes, keeping a preview within the cap."""
    options = EnvelopeOptions(max_envelope_bytes=8192)
    env = build({"text": "\u00e9\u65e5\U0001f600" * 20_000}, failed(boom), options=options)
    assert envelope_size(env) <= 8192
    assert "payload" in env["truncated"]
    assert "envelope" not in env["truncated"]  # a preview, not the bare-minimum fallback
    assert len(env["payload_preview"]) > 500


def test_envelope_size_cap_trims_traceback_before_payload() -> None:
    """When trimming the traceback is enough, the payload stays intact."""
    options = EnvelopeOptions(max_envelope_bytes=4096, max_traceback_frames=200)
    env = build({"n": 1}, failed(lambda: recurse(150)), options=options)
    assert envelope_size(env) <= 4096
    assert env["payload"] == {"n": 1}
    assert env["truncated"] == ["traceback"]


def test_envelope_size_cap_keeps_the_newest_failed_write_and_the_count() -> None:
    """Over the cap, the listed failed writes are cut to the newest one; their count, times and
    the payload stay."""
    builder = EnvelopeBuilder(EnvelopeOptions(max_envelope_bytes=4096, max_traceback_frames=0))
    env = builder.build(
        Delivery({"n": 1}), failed(boom), reason="timeout", stage="handle", monotonic_now=0.0
    )
    assert env["write_failures"] == {"count": 0, "first": None, "last": None, "recent": []}
    recent = [
        {"at": float(i), "type": "OSError", "message": f"{i} " + "z" * 480} for i in range(10)
    ]
    env["write_failures"] = {"count": 25, "first": 0.0, "last": 9.0, "recent": recent}
    env = builder.refit(env)
    assert envelope_size(env) <= 4096
    assert env["write_failures"]["count"] == 25
    assert env["write_failures"]["first"] == 0.0
    assert [f["at"] for f in env["write_failures"]["recent"]] == [9.0]
    assert env["payload"] == {"n": 1}
    assert "write_failures" in env["truncated"]


def test_pathological_envelopes_shrink_to_a_minimal_record() -> None:
    """Even with an enormous key, the envelope respects the cap and keeps reason and type."""
    delivery = Delivery({"n": 1}, key="k" * 50_000)
    builder = EnvelopeBuilder(EnvelopeOptions(max_envelope_bytes=4096))
    env = builder.build(delivery, failed(boom), reason="timeout", stage="handle", monotonic_now=0.0)
    assert envelope_size(env) <= 4096
    assert env["error"]["reason"] == "timeout"
    assert env["error"]["type"] == "ConnectionError"
    assert "envelope" in env["truncated"]


def test_undecodable_body_is_kept_raw() -> None:
    """A poison message keeps its raw body (utf-8 text, or base64 for binary) and no payload."""
    message = InboundMessage(
        payload={}, key="orders", message_id="9", raw=b"\xff{", decode_error=ValueError("bad")
    )
    delivery = Delivery.from_message(message, started_at=0.0)
    env = EnvelopeBuilder().build(
        delivery, ValueError("bad"), reason="decode_error", stage="decode", monotonic_now=0.0
    )
    assert env["payload"] is None
    assert env["raw"] == {"encoding": "base64", "data": "/3s="}
    assert env["attempts"]["in_process"] == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_envelope_bytes", 100),
        ("max_traceback_frames", -1),
        ("max_traceback_bytes", "big"),
        ("max_message_chars", True),
    ],
)
def test_options_reject_impossible_caps(name: str, value: Any) -> None:
    """Caps below their minimum or of the wrong type raise a ConfigError naming them."""
    with pytest.raises(ConfigError, match=name):
        EnvelopeOptions(**{name: value})


def test_strings_inside_a_masked_value_are_scrubbed_from_the_error() -> None:
    """A masked mapping or list hides its strings from the message and traceback too."""
    payload = {"authorization": {"scheme": "bearer", "credentials": ["tok-abcdef"]}}
    env = build(payload, failed(lambda: boom("rejected bearer tok-abcdef")))
    assert env["payload"] == {"authorization": MASK}
    assert "tok-abcdef" not in json.dumps(env)
    assert env["error"]["message"] == f"rejected {MASK} {MASK}"


def test_a_secret_containing_another_is_masked_whole() -> None:
    """Scrubbing replaces longer secrets first, so no tail of one is left behind."""
    assert Redactor.scrub("key=abcd-efgh-ijkl", {"abcd", "abcd-efgh-ijkl"}) == f"key={MASK}"


def test_a_secret_across_the_message_cap_is_not_partly_kept() -> None:
    """Masking happens before the message is cut, so the cut cannot keep half a secret."""
    secret = "s3cret-" + "x" * 40
    options = EnvelopeOptions(max_message_chars=80)
    env = build(
        {"password": secret}, failed(lambda: boom("y" * 60 + secret + "z" * 40)), options=options
    )
    assert "s3cret" not in json.dumps(env)
    assert "message" in env["truncated"]


def test_fields_of_an_undecodable_json_like_body_are_masked() -> None:
    """A raw body that is almost JSON still has its configured fields masked."""
    raw = b'{"user": "ann", "Password": "hunter22", "api_key": 12345678, "note": "ok"'
    message = InboundMessage(
        payload={}, key="orders", message_id="9", raw=raw, decode_error=ValueError("eof")
    )
    delivery = Delivery.from_message(message, started_at=0.0)
    env = EnvelopeBuilder().build(
        delivery, ValueError("bad hunter22"), reason="decode_error", stage="decode", monotonic_now=0
    )
    assert env["raw"]["data"] == (
        f'{{"user": "ann", "Password": "{MASK}", "api_key": "{MASK}", "note": "ok"'
    )
    assert env["redacted"] == ["raw.Password", "raw.api_key"]
    assert "hunter22" not in json.dumps(env)
