"""Redaction keeps its promise at any depth: no value of a masked field, no Bearer or Basic
credential, reaches the envelope, the rendered dead letter or the dead-letter log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import string
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilience.dead_letter import MASK, DeadLetterRouter, EnvelopeBuilder, MemoryStore, Redactor
from resilience.dead_letter.redaction import field_words
from resilience.dead_letter.render import render_record
from resilience.dead_letter.sinks import DeadLetterRecord
from resilience.delivery import Delivery
from resilience.errors import DeadLetterWriteError

pytestmark = pytest.mark.timeout(300)


def failed(message: str) -> BaseException:
    """An exception quoting ``message``, raised from another that quotes it too."""
    try:
        try:
            raise KeyError(f"lookup of {message}")
        except KeyError as inner:
            raise ConnectionError(f"rejected: {message}") from inner
    except ConnectionError as exc:
        return exc


def nest(inner: Any, depth: int, key: str = "a") -> Any:
    """``inner`` under ``depth`` levels of alternating mappings and lists (built iteratively)."""
    value = inner
    for level in range(depth):
        value = {key: value, "n": level} if level % 2 else [0, value]
    return value


def build(payload: Any, exc: BaseException, headers: dict[str, str] | None = None) -> Any:
    delivery = Delivery(payload, key="orders", message_id="7", headers=headers)
    return EnvelopeBuilder().build(
        delivery, exc, reason="non_retryable", stage="handle", monotonic_now=0.0
    )


@pytest.mark.parametrize("depth", [63, 64, 65, 200, 5000])
def test_a_masked_value_below_the_rendered_depth_is_still_scrubbed(depth: int) -> None:
    """A password nested deeper than the rendered 64 levels is collected all the same, so the
    exception message and traceback quoting it are masked, with no RecursionError."""
    payload = {"root": nest({"password": "hunter2-deep"}, depth)}
    env = build(payload, failed("hunter2-deep"))
    text = json.dumps(env)
    assert "hunter2-deep" not in text
    assert env["error"]["message"] == f"rejected: {MASK}"
    assert f"KeyError: 'lookup of {MASK}'" in env["error"]["traceback"]
    assert any(path.endswith("password") for path in env["redacted"])


def test_a_payload_cut_at_the_rendered_depth_is_marked_truncated() -> None:
    """A payload deeper than the rendered 64 levels is listed as truncated (so it is never
    replayed half-cut); a shallower one is not."""
    deep = build({"root": nest(1, 80)}, failed("boom"))
    assert "[TOO DEEP]" in json.dumps(deep["payload"])
    assert deep["truncated"] == ["payload"]
    shallow = build({"root": nest(1, 40)}, failed("boom"))
    assert shallow["truncated"] == []


def test_a_cyclic_payload_is_rendered_and_scrubbed() -> None:
    """A payload that contains itself ends in a bounded copy; its masked value is still found."""
    payload: dict[str, Any] = {"token": "cyc-token-1"}
    payload["self"] = {"again": payload}
    env = build(payload, failed("cyc-token-1"))
    assert "cyc-token-1" not in json.dumps(env)


@pytest.mark.parametrize(
    "name",
    [
        "client_secret",
        "x_api_key",
        "X-Api-Key",
        "xApiKey",
        "APIKEY",
        "passwordHash",
        "userPassword",
        "Proxy-Authorization",
        "set-cookie",
        "refreshToken",
        "db.password",
        "SECRET_KEY_2",
    ],
)
def test_prefix_and_suffix_forms_of_masked_names_are_masked(name: str) -> None:
    """Masked names are matched as leading or trailing words, in any case or separator style."""
    env = build({"data": {name: "v4lue-x"}}, failed("v4lue-x"))
    assert env["payload"]["data"][name] == MASK
    assert "v4lue-x" not in json.dumps(env)


@pytest.mark.parametrize(
    "name", ["secretary", "tokens", "max_token_count", "passenger", "keyboard", "cookies_enabled"]
)
def test_names_that_only_contain_a_masked_word_are_kept(name: str) -> None:
    """A masked word inside another word, or in the middle of a name, does not match."""
    env = build({name: "plain"}, failed("boom"))
    assert env["payload"] == {name: "plain"}
    assert env["redacted"] == []


def test_field_words_split_case_separators_and_digits() -> None:
    """Names split into lowercase words at separators, camel humps and digits."""
    assert field_words("HTTPAuthorization") == ("http", "authorization")
    assert field_words("x-Api_key.v2") == ("x", "api", "key", "v")
    assert field_words("__") == ()


def test_bearer_and_basic_credentials_are_masked_wherever_they_appear() -> None:
    """Credentials after Bearer or Basic are masked in messages, tracebacks and headers of any
    name, and then also wherever else they occur."""
    headers = {"x-forwarded-auth": "Bearer eyJhbGciOi.abc", "traceparent": "00-ab-cd-01"}
    exc = failed("Authorization: Basic dXNlcjpwYXNz and token eyJhbGciOi.abc")
    env = build({"n": 1}, exc, headers=headers)
    text = json.dumps(env)
    assert "eyJhbGciOi.abc" not in text
    assert "dXNlcjpwYXNz" not in text
    assert env["headers"]["x-forwarded-auth"] == f"Bearer {MASK}"
    assert env["headers"]["traceparent"] == "00-ab-cd-01"
    assert "headers.x-forwarded-auth" in env["redacted"]


def test_pairs_of_masked_names_in_free_text_are_masked() -> None:
    """``name=value`` and quoted pairs of masked names are masked in messages even when the
    value is in no payload."""
    redactor = Redactor()
    text = (
        "connect failed: password=hunter2 {'client_secret': 'abc'} \"api-key\": \"k1\" "
        "Authorization: Token zzz9 keep=this"
    )
    assert redactor.mask_text(text) == (
        f"connect failed: password={MASK} {{'client_secret': '{MASK}'}} \"api-key\": \"{MASK}\" "
        f"Authorization: {MASK} keep=this"
    )


def test_numeric_values_are_masked_in_free_text_from_four_characters() -> None:
    """Numbers of masked fields are scrubbed from messages when 4 characters or longer; shorter
    ones are masked in the payload only (documented: substituting them would blank out
    unrelated text)."""
    env = build({"token": 98765432, "pin": {"secret": 12.5}}, failed("codes 98765432 and 12.5"))
    assert env["payload"] == {"token": MASK, "pin": {"secret": MASK}}
    assert env["error"]["message"] == f"rejected: codes {MASK} and {MASK}"
    short = build({"token": 123}, failed("code 123"))
    assert short["payload"] == {"token": MASK}
    assert short["error"]["message"] == "rejected: code 123"


def test_a_secret_copied_into_another_field_is_masked_there_too() -> None:
    """A masked value that also appears in an unmasked string of the payload is masked there."""
    env = build({"password": "p4ssw0rd!", "echo": "you sent p4ssw0rd!"}, failed("x"))
    assert env["payload"] == {"password": MASK, "echo": f"you sent {MASK}"}
    assert sorted(env["redacted"]) == ["payload.echo", "payload.password"]


# -- the property --------------------------------------------------------------------------

BASES = ["password", "passwd", "secret", "token", "access_token", "refresh_token", "api_key"]
EXTRA = ["x", "client", "user", "old", "db", "my"]
STYLES = ["snake", "kebab", "dot", "camel", "pascal", "upper"]


def spell(words: list[str], style: str) -> str:
    """``words`` joined in one naming style."""
    if style == "snake":
        return "_".join(words)
    if style == "kebab":
        return "-".join(words)
    if style == "dot":
        return ".".join(words)
    if style == "upper":
        return "_".join(words).upper()
    head = words[0] if style == "camel" else words[0].capitalize()
    return head + "".join(w.capitalize() for w in words[1:])


@st.composite
def masked_names(draw: st.DrawFn) -> str:
    """A masked name in a random style, maybe with a word before or after it."""
    words = draw(st.sampled_from(BASES)).split("_")
    where = draw(st.sampled_from(["none", "before", "after"]))
    extra = draw(st.sampled_from(EXTRA))
    if where == "before":
        words = [extra, *words]
    elif where == "after":
        words = [*words, extra]
    return spell(words, draw(st.sampled_from(STYLES)))


secret_texts = st.text(string.ascii_letters + string.digits, min_size=8, max_size=16).map(
    lambda s: "Zq" + s
)
secret_numbers = st.integers(10**13, 10**15)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Any, dict[str, str], str, str]:
    """(payload, headers, secret as text, exception message quoting it)."""
    number = draw(st.booleans())
    secret: Any = draw(secret_numbers if number else secret_texts)
    text = str(secret)
    name = draw(masked_names())
    shape = draw(st.sampled_from(["plain", "list", "mapping", "bytes"]))
    value: Any = secret
    if shape == "list":
        value = [1, secret]
    elif shape == "mapping":
        value = {"scheme": "bearer", "value": secret}
    elif shape == "bytes" and not number:
        value = text.encode()
    depth = draw(st.sampled_from([0, 1, 5, 63, 64, 65, 100, 1000, 3000]))
    payload = {"order": draw(st.integers(0, 9)), "deep": nest({"k": 1, name: value}, depth)}
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    place = draw(st.sampled_from(["payload", "header", "bearer_header", "message_only"]))
    if place == "header":
        headers[name] = text
        payload = {"order": 1}
    elif place == "bearer_header":
        headers["x-upstream-auth"] = f"Bearer {text}"
        payload = {"order": 1}
    elif place == "message_only":
        payload = {"order": 1}
        message = draw(
            st.sampled_from(
                [
                    f"Authorization: Bearer {text}",
                    f"Authorization: Basic {text}",
                    f"{name}={text}",
                    f"{{'{name}': '{text}'}}",
                    f'"{name}": "{text}"',
                ]
            )
        )
        return payload, headers, text, message
    message = draw(
        st.sampled_from([f"failed for {text}", f"{name}={text}", f"bad value {text}!", text])
    )
    return payload, headers, text, message


@pytest.fixture
def stdlib_records() -> Iterator[list[logging.LogRecord]]:
    """Every record logged under ``resilience`` while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("resilience")
    handler = Keep(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@given(cases(), st.booleans())
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_no_rendering_of_a_dead_letter_contains_a_masked_value(
    stdlib_records: list[logging.LogRecord],
    case: tuple[Any, dict[str, str], str, str],
    sink_fails: bool,
) -> None:
    """Whatever the depth, key form and place of a secret, the envelope, its `dlq show`
    rendering, the dead-letter log lines and the write error never contain it."""
    payload, headers, secret, message = case
    stdlib_records.clear()
    store = MemoryStore()
    if sink_fails:
        store.failure = OSError(f"could not store {message}")
    router = DeadLetterRouter(store, write_failure_backoff=0)

    async def call_next(delivery: Delivery) -> None:
        raise failed(message)

    delivery = Delivery(payload, key="orders", message_id="9", headers=headers)
    texts: list[str] = []
    with structlog.testing.capture_logs() as logs:
        try:
            asyncio.run(router(delivery, call_next))
        except DeadLetterWriteError as exc:
            assert sink_fails
            texts.append(str(exc))
    texts.append(repr(logs))
    formatter = logging.Formatter()
    # A record's fields may travel as attributes of the LogRecord: check them all.
    texts += [formatter.format(record) + repr(vars(record)) for record in stdlib_records]
    if not sink_fails:
        (envelope,) = store.envelopes
        texts.append(json.dumps(envelope))
        texts.append(render_record(DeadLetterRecord("x" * 32, envelope, 0.0)))
        assert envelope["redacted"] or MASK in envelope["error"]["message"]
    events = "".join(texts)
    assert ("dead_lettered" in events) != sink_fails
    assert ("dead_letter_write_failed" in events) == sink_fails
    for text in texts:
        assert secret not in text
