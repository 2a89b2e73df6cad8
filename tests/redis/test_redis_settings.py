"""Settings, environment parsing and the wire codec of the Redis backend (no Redis needed)."""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from abe.backends.message_queue.base import (
    DeadLetteringBackend,
    HeaderPublishingBackend,
    SettlingBackend,
)
from abe.backends.message_queue.loader import load_backend
from abe.backends.message_queue.service._redis_codec import (
    NO_HEADERS,
    EntryDecodeError,
    decode_batch,
    decode_entry,
    encode_entry,
    parse_json,
)
from abe.backends.message_queue.service._redis_settings import RedisSettings, redact
from abe.backends.message_queue.service.redis import RedisBackend
from abe.types import MessageQueueBackendProtocol

# -- settings -----------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    """Without arguments the settings are the documented defaults."""
    s = RedisSettings()
    assert s.url == "redis://localhost:6379/0"
    assert s.streams == ("events",)
    assert s.group == "abe"
    assert s.consumer == f"{socket.gethostname()}-{os.getpid()}"
    assert (s.batch_size, s.block, s.claim_idle, s.maxlen) == (100, 2.0, 60.0, None)
    assert s.ack_limit == 200
    assert (s.block_ms, s.claim_idle_ms) == (2000, 60000)


def test_from_environ_reads_every_variable() -> None:
    """Each REDIS_* variable lands in its setting, milliseconds turned into seconds."""
    s = RedisSettings.from_environ(
        {
            "REDIS_URL": "rediss://:secret@redis.internal:6380/2",
            "REDIS_STREAMS": "orders, payments ,orders",
            "REDIS_GROUP": "billing",
            "REDIS_CONSUMER": "worker-7",
            "REDIS_BATCH_SIZE": "250",
            "REDIS_BLOCK_MS": "500",
            "REDIS_CLAIM_IDLE_MS": "45000",
            "REDIS_MAXLEN": "100000",
        }
    )
    assert s.url == "rediss://:secret@redis.internal:6380/2"
    assert s.streams == ("orders", "payments")
    assert (s.group, s.consumer, s.batch_size) == ("billing", "worker-7", 250)
    assert (s.block, s.claim_idle, s.maxlen) == (0.5, 45.0, 100000)


def test_from_environ_with_nothing_set_gives_the_defaults() -> None:
    """Unset or blank variables mean the defaults."""
    s = RedisSettings.from_environ({"REDIS_STREAMS": "  ", "REDIS_CONSUMER": "x"})
    assert s == RedisSettings(consumer="x")


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("REDIS_URL", "http://localhost:6379", "redis://"),
        ("REDIS_STREAMS", "orders,,payments", "comma-separated stream keys"),
        ("REDIS_BATCH_SIZE", "0", "integer >= 1"),
        ("REDIS_BATCH_SIZE", "ten", "integer >= 1"),
        ("REDIS_BLOCK_MS", "-5", "integer >= 0"),
        ("REDIS_CLAIM_IDLE_MS", "1.5", "integer >= 1"),
        ("REDIS_MAXLEN", "0", "integer >= 1"),
    ],
)
def test_invalid_variables_name_the_variable_the_value_and_what_is_allowed(
    name: str, value: str, allowed: str
) -> None:
    """A bad variable raises ValueError naming it, its value and what is allowed."""
    with pytest.raises(ValueError, match=name) as info:
        RedisSettings.from_environ({name: value})
    assert repr(value) in str(info.value)
    assert allowed in str(info.value)


def test_redis_password_is_used_when_the_url_has_none() -> None:
    """REDIS_PASSWORD goes into a URL without a password and never replaces one."""
    s = RedisSettings.from_environ({"REDIS_URL": "redis://cache:6379/1", "REDIS_PASSWORD": "pw"})
    assert s.url == "redis://:pw@cache:6379/1"
    kept = RedisSettings.from_environ(
        {"REDIS_URL": "redis://u:own@cache/0", "REDIS_PASSWORD": "pw"}
    )
    assert kept.url == "redis://u:own@cache/0"


def test_a_redis_password_with_url_characters_survives_the_url() -> None:
    """REDIS_PASSWORD is percent-encoded into the URL: redis-py reads it back unchanged (with
    '@', '/', ':', '#', '?', '%' and spaces), the host stays right, and redact() hides it all."""
    password = " p@ss/w:rd#1?%x "
    s = RedisSettings.from_environ(
        {"REDIS_URL": "redis://cache:6380/1", "REDIS_PASSWORD": password}
    )
    kwargs = aioredis.Redis.from_url(s.url).connection_pool.connection_kwargs
    assert kwargs["password"] == password
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache", 6380, 1)
    assert redact(s.url) == "redis://:***@cache:6380/1"


def test_redact_hides_the_password_only() -> None:
    """Messages show the URL with the password replaced by ***."""
    assert redact("rediss://user:s3cret@host:6380/0") == "rediss://user:***@host:6380/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"claim_idle": 0}, ValueError, "claim_idle"),
        ({"block": -1}, ValueError, "block"),
        ({"block": float("nan")}, ValueError, "block"),
        ({"claim_idle": "60"}, TypeError, "claim_idle"),
        ({"streams": "orders"}, TypeError, "not a single string"),
        ({"streams": ()}, ValueError, "at least one"),
        ({"streams": ("ok", " ")}, ValueError, "stream key"),
        ({"group": ""}, ValueError, "group"),
        ({"maxlen": 0}, ValueError, "maxlen"),
        ({"ack_batch": -1}, ValueError, "ack_batch"),
        ({"reconnect_initial": 2.0, "reconnect_max": 1.0}, ValueError, "reconnect_max"),
        ({"url": "localhost:6379"}, ValueError, "redis://"),
    ],
)
def test_invalid_settings_raise_naming_the_setting(
    kwargs: dict[str, Any], error: type[Exception], text: str
) -> None:
    """An impossible setting raises at construction, naming the setting."""
    with pytest.raises(error, match=text):
        RedisSettings(**kwargs)


def test_durations_accept_timedelta() -> None:
    """block and claim_idle accept a timedelta and are kept as float seconds."""
    # RedisSettings converts a timedelta, but its fields are annotated float only.
    s = RedisSettings(
        block=timedelta(milliseconds=250),  # type: ignore[arg-type]
        claim_idle=timedelta(minutes=2),  # type: ignore[arg-type]
    )
    assert (s.block, s.claim_idle) == (0.25, 120.0)


# -- the backend object (no connection is made) --------------------------------------------------


def test_backend_implements_the_protocol_and_every_extension() -> None:
    """RedisBackend is a MessageQueueBackend and implements all three extensions."""
    backend = RedisBackend(streams=["s"], consumer="c")
    for protocol in (
        MessageQueueBackendProtocol,
        SettlingBackend,
        DeadLetteringBackend,
        HeaderPublishingBackend,
    ):
        assert isinstance(backend, protocol)


def test_backend_arguments_override_settings() -> None:
    """Keyword arguments win over a given RedisSettings; the rest is kept."""
    base = RedisSettings(url="redis://h:1/0", streams=("a",), batch_size=7, consumer="x")
    backend = RedisBackend(settings=base, batch_size=9, streams=["b", "c"])
    assert backend.settings.batch_size == 9
    assert backend.settings.streams == ("b", "c")
    assert backend.settings.url == "redis://h:1/0"


def test_backend_repr_redacts_the_password() -> None:
    """repr() of a backend never shows the password."""
    backend = RedisBackend("redis://:hunter2@localhost:6379/0", consumer="c")
    assert "hunter2" not in repr(backend)
    assert "***" in repr(backend)


def test_a_client_that_decodes_responses_is_rejected() -> None:
    """A redis client made with decode_responses=True is refused with a clear error."""
    client = aioredis.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisBackend(client=client)


@pytest.mark.parametrize(
    ("socket_timeout", "block", "accepted"),
    [(None, 30.0, True), (5.0, 2.0, True), (2.0, 2.0, False), (1.0, 2.0, False)],
)
def test_a_client_whose_socket_timeout_would_cut_blocking_reads_is_rejected(
    socket_timeout: float | None, block: float, accepted: bool
) -> None:
    """A passed client must time out later than a blocking read waits (block), or every
    idle read would count as a lost connection; the error names both settings."""
    client = aioredis.Redis(socket_timeout=socket_timeout)
    if accepted:
        RedisBackend(client=client, block=block, consumer="c")
    else:
        with pytest.raises(ValueError, match=r"block \(2s\).*socket_timeout \(.*s\)"):
            RedisBackend(client=client, block=block, consumer="c")


def test_the_redis_py_default_socket_timeout_is_read_from_its_connections() -> None:
    """A client made without socket_timeout gets redis-py's default, and the backend sees it."""
    from abe.backends.message_queue.service._redis_common import socket_timeout_of

    default = aioredis.Redis.from_url("redis://localhost:6379/0")
    # redis-py leaves ConnectionPool.make_connection unannotated.
    connection = default.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    assert socket_timeout_of(default) == connection.socket_timeout
    assert socket_timeout_of(aioredis.Redis(socket_timeout=None)) is None
    assert socket_timeout_of(aioredis.Redis(socket_timeout=3)) == 3.0


def test_from_env_and_the_loader_build_a_configured_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QUEUE_BACKEND=redis makes load_backend() return a RedisBackend built from REDIS_*."""
    monkeypatch.setenv("QUEUE_BACKEND", "redis")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/3")
    monkeypatch.setenv("REDIS_STREAMS", "orders,refunds")
    monkeypatch.setenv("REDIS_GROUP", "billing")
    backend = load_backend()
    assert isinstance(backend, RedisBackend)
    assert backend.settings.url == "redis://127.0.0.1:6390/3"
    assert backend.settings.streams == ("orders", "refunds")
    assert backend.settings.group == "billing"


def test_from_env_rejects_a_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_env() raises ValueError naming a bad variable."""
    monkeypatch.setenv("REDIS_BATCH_SIZE", "lots")
    with pytest.raises(ValueError, match="REDIS_BATCH_SIZE='lots'"):
        RedisBackend.from_env()


# -- the wire codec -------------------------------------------------------------------------------


def test_encode_entry_writes_data_and_header_fields() -> None:
    """The payload goes to field data as compact JSON, each header to an h:<name> field."""
    fields = encode_entry({"id": 1, "tags": ["a"]}, {"traceparent": "00-abc-01"})
    assert fields == {b"data": '{"id":1,"tags":["a"]}', b"h:traceparent": "00-abc-01"}


@pytest.mark.parametrize(
    ("payload", "headers", "text"),
    [
        ({"when": object()}, None, "not JSON-serialisable"),
        (["not", "a", "dict"], None, "payload must be a dict"),
        ({"ok": 1}, {"n": 1}, "headers must map"),
    ],
)
def test_encode_entry_rejects_what_cannot_travel(payload: Any, headers: Any, text: str) -> None:
    """Non-JSON payloads, non-dict payloads and non-string headers raise TypeError."""
    with pytest.raises(TypeError, match=text):
        encode_entry(payload, headers)


def test_decode_entry_reads_payload_headers_and_enqueue_time() -> None:
    """A wire-format entry decodes to its payload, headers, id, count and publish time."""
    m = decode_entry(
        "orders",
        b"1700000000123-4",
        {b"data": b'{"n": 1}', b"h:traceparent": b"00-x", b"other": b"ignored"},
        "g",
        3,
        None,
    )
    assert (m.payload, m.key, m.message_id, m.delivery_count, m.group) == (
        {"n": 1},
        "orders",
        "1700000000123-4",
        3,
        "g",
    )
    assert m.headers == {"traceparent": "00-x"}
    assert m.enqueued_at == pytest.approx(1700000000.123)
    assert m.decode_error is None


@pytest.mark.parametrize(
    ("fields", "raw", "text"),
    [
        ({b"data": b"{not json"}, b"{not json", "not JSON"),
        ({b"data": b"[1, 2]"}, b"[1, 2]", "not an object"),
        ({b"data": b"\xff\xfe"}, b"\xff\xfe", "not JSON"),
        ({b"payload": b"{}"}, b"payload={}", "no 'data' field"),
    ],
)
def test_undecodable_entries_are_poison_with_raw_bytes_kept(
    fields: dict[bytes, bytes], raw: bytes, text: str
) -> None:
    """An entry not in the wire format keeps its raw bytes and says why in decode_error."""
    m = decode_entry("k", b"1-0", fields, "g", 1, None)
    assert m.payload == {}
    assert m.raw == raw
    assert isinstance(m.decode_error, EntryDecodeError)
    assert text in str(m.decode_error)


def test_decode_batch_matches_decode_entry_and_records_held_ids() -> None:
    """The fast batch path gives the same messages as decode_entry and records every id."""
    entries: list[tuple[bytes, dict[bytes, bytes] | None]] = [
        (b"5-0", {b"data": b'{"a":1}'}),
        (b"5-1", {b"data": b' {"a": 2} '}),
        (b"5-2", None),
        (b"5-3", {b"data": b"oops"}),
        (b"5-4", {b"data": b'{"a":3}', b"h:tp": b"x"}),
        (b"57-0", {b"data": b'{"a":4}'}),
        (b"57-1", {b"data": b'{"a":5}'}),
        (b"5-5", {b"data": b'{"a":6}'}),
    ]
    out: list[Any] = []
    held: dict[str, bytes] = {}
    poison = decode_batch("k", entries, "g", "H", held, out.append, {b"5-1": 4})
    expected = [
        decode_entry("k", i, f, "g", {b"5-1": 4}.get(i, 2), "H")
        for i, f in entries
        if f is not None
    ]
    assert poison == 1

    def view(m: Any) -> tuple[Any, ...]:
        return (m.payload, m.message_id, m.delivery_count, dict(m.headers), m.enqueued_at)

    assert [view(m) for m in out] == [view(m) for m in expected]
    assert [m.enqueued_at for m in out] == [0.005] * 4 + [0.057, 0.057, 0.005]
    assert set(held) == {"5-0", "5-1", "5-3", "5-4", "57-0", "57-1", "5-5"}
    assert held["57-0"] == b"57-0"
    assert out[0].headers is NO_HEADERS
    assert out[0].handle == "H"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(value=_json, compact=st.booleans())
def test_parse_json_agrees_with_json_loads(value: Any, compact: bool) -> None:
    """The fast JSON path returns exactly what json.loads returns."""
    text = json.dumps(value, separators=(",", ":") if compact else None)
    assert parse_json(text.encode()) == json.loads(text)
