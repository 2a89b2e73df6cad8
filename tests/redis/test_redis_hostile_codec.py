"""Property tests: no stream entry's content, size or shape makes the codec or the reader raise.

Every entry comes out exactly once, either decoded (a JSON object payload) or as poison
(``decode_error`` set, the raw body kept); the other entries of its batch are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.backends.message_queue.service._redis_codec import (
    EntryDecodeError,
    decode_batch,
    decode_entry,
)
from abe.backends.message_queue.service.redis import RedisBackend
from tests.consume_stream import closable

pytestmark = pytest.mark.timeout(300)


def nested(depth: int, opener: str = "[", inner: str = "") -> bytes:
    """JSON nesting ``depth`` arrays (``[``) or objects (``{"a":``) around ``inner``."""
    if opener == "[":
        return ("[" * depth + inner + "]" * depth).encode()
    return ('{"a":' * depth + (inner or "1") + "}" * depth).encode()


@st.composite
def data_values(draw: st.DrawFn) -> bytes:
    """A ``data`` field: valid objects, other JSON, deep nesting, arbitrary and huge bytes."""
    kind = draw(
        st.sampled_from(
            ["object", "json", "deep", "deep_in_object", "bytes", "huge", "almost", "unicode"]
        )
    )
    if kind == "object":
        value = draw(
            st.dictionaries(
                st.text(max_size=8),
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: (
                        st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3)
                    ),
                    max_leaves=10,
                ),
                max_size=4,
            )
        )
        return json.dumps(value, separators=(",", ":")).encode()
    if kind == "json":
        scalar = draw(st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans()))
        return json.dumps(draw(st.sampled_from([scalar, [scalar], "x"]))).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([900, 1000, 2000, 10_000, 50_000]))
        return nested(depth, draw(st.sampled_from(["[", "{"])))
    if kind == "deep_in_object":
        depth = draw(st.sampled_from([3, 50, 5000, 20_000]))
        return b'{"payload":' + nested(depth) + b"}"
    if kind == "huge":
        size = draw(st.sampled_from([64 * 1024, 1024 * 1024]))
        return b'{"blob":"' + b"x" * size + b'"}'
    if kind == "almost":
        text = json.dumps({"password": draw(st.text(max_size=6)), "n": 1})
        cut = draw(st.integers(0, len(text)))
        return (text[:cut] + draw(st.text(max_size=4))).encode("utf-8", errors="surrogatepass")
    if kind == "unicode":
        return draw(st.text(max_size=20)).encode("utf-8", errors="surrogatepass")
    return draw(st.binary(max_size=64))


field_names = st.one_of(
    st.binary(max_size=10),
    st.sampled_from(
        [b"data", b"h:", b"h:traceparent", b"h:tracestate", b"h:x-replay-count", b"h:\xff\xfe"]
    ),
    st.binary(max_size=8).map(lambda b: b"h:" + b),
)

header_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"00-" + b"f" * 32 + b"-" + b"f" * 16 + b"-01",
            b"00-zz-yy-01",
            b"\xb2",  # superscript two: str.isdigit() but not int()
            "²".encode(),
            b"9" * 5000,  # int() refuses strings this long
            b"-1",
            b"x" * 100_000,
        ]
    ),
)


@st.composite
def field_maps(draw: st.DrawFn) -> dict[bytes, bytes]:
    """An entry's fields: maybe a ``data`` field, maybe headers, maybe anything else."""
    fields = draw(st.dictionaries(field_names, header_values, max_size=4))
    if draw(st.booleans()):
        fields[b"data"] = draw(data_values())
    elif b"data" in fields and draw(st.booleans()):
        del fields[b"data"]
    return fields


UNKNOWN = object()
"""The reference parser itself ran out of stack: decoded or poison are both acceptable."""


def expected_payload(fields: dict[bytes, bytes]) -> object:
    """The payload the entry must decode to, ``None`` when it must be poison, or
    :data:`UNKNOWN`."""
    data = fields.get(b"data")
    if data is None:
        return None
    try:
        value = json.loads(data.decode())
    except RecursionError:
        return UNKNOWN
    except ValueError:
        return None
    return value if type(value) is dict else None


def check_message(message: InboundMessage, fields: dict[bytes, bytes]) -> None:
    """``message`` is the faithful decoding of ``fields``, or poison that keeps the raw body."""
    expected = expected_payload(fields)
    if message.decode_error is None:
        assert type(message.payload) is dict
        if expected is not UNKNOWN:
            assert expected is not None, "an entry that is not a JSON object was decoded"
            assert message.payload == expected
        assert message.body_size == len(fields[b"data"])
    else:
        assert isinstance(message.decode_error, EntryDecodeError)
        assert message.payload == {}
        if expected is not UNKNOWN:
            assert expected is None, f"a valid entry became poison: {message.decode_error}"
        assert message.raw is not None
        if b"data" in fields:
            assert message.raw == fields[b"data"]
    headers = {
        name[2:].decode(errors="replace"): value.decode(errors="replace")
        for name, value in fields.items()
        if name.startswith(b"h:")
    }
    assert dict(message.headers) == headers


@given(st.lists(field_maps(), min_size=1, max_size=6), st.integers(1, 5))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decode_batch_turns_every_entry_into_one_message(
    entries: list[dict[bytes, bytes]], count: int
) -> None:
    """decode_batch never raises: each entry gives one message, decoded or poison, in order."""
    ids = [f"{1700000000000 + i // 2}-{i}".encode() for i in range(len(entries))]
    out: list[InboundMessage] = []
    held: dict[str, bytes] = {}
    counts = {entry_id: count for entry_id in ids}
    poison = decode_batch(
        "s", list(zip(ids, entries, strict=True)), "g", None, held, out.append, counts
    )
    assert [m.message_id for m in out] == [i.decode() for i in ids]
    assert held == {i.decode(): i for i in ids}
    assert poison == sum(m.decode_error is not None for m in out)
    for message, fields in zip(out, entries, strict=True):
        assert message.delivery_count == count
        check_message(message, fields)


@given(st.lists(field_maps(), min_size=1, max_size=6))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flat_field_lists_decode_as_their_maps(entries: list[dict[bytes, bytes]]) -> None:
    """Fields as the server sends them (``[name, value, ...]``, what the reader reads now) give
    the same messages as the maps redis-py would have built of them."""
    ids = [f"{1700000000000 + i}-{i}".encode() for i in range(len(entries))]
    flat = [[item for pair in fields.items() for item in pair] for fields in entries]
    as_maps: list[InboundMessage] = []
    as_lists: list[InboundMessage] = []
    poison = decode_batch("s", list(zip(ids, entries, strict=True)), "g", None, {}, as_maps.append)
    assert decode_batch("s", list(zip(ids, flat, strict=True)), "g", None, {}, as_lists.append) == (
        poison
    )
    for from_map, from_list, fields in zip(as_maps, as_lists, entries, strict=True):
        check_message(from_list, fields)
        assert (from_list.payload, from_list.raw, dict(from_list.headers)) == (
            from_map.payload,
            from_map.raw,
            dict(from_map.headers),
        )
        assert (from_list.body_size, from_list.enqueued_at) == (
            from_map.body_size,
            from_map.enqueued_at,
        )


def test_a_flat_field_list_of_odd_length_is_poison_not_an_error() -> None:
    """A malformed field list (a name without a value) makes its entry poison; the others in
    the batch are decoded."""
    entries = [(b"1-0", [b"data", b'{"n":0}']), (b"1-1", [b"data"]), (b"1-2", [b"data", b"{}"])]
    out: list[InboundMessage] = []
    assert decode_batch("s", entries, "g", None, {}, out.append) == 1
    assert [m.payload for m in out] == [{"n": 0}, {}, {}]
    assert out[1].decode_error is not None


@pytest.mark.parametrize("depth", [1000, 10_000, 100_000])
@pytest.mark.parametrize("opener", ["[", "{"])
def test_deep_nesting_is_poison_with_the_parser_error_as_cause(depth: int, opener: str) -> None:
    """JSON nested beyond the parser's limit is poison (RecursionError as the cause), and the
    valid entries around it in the batch are decoded."""
    entries = [
        (b"1-0", {b"data": b'{"n":0}'}),
        (b"1-1", {b"data": nested(depth, opener)}),
        (b"1-2", {b"data": b'{"n":2}'}),
    ]
    out: list[InboundMessage] = []
    assert decode_batch("s", entries, "g", None, {}, out.append) == 1
    assert [m.payload for m in out] == [{"n": 0}, {}, {"n": 2}]
    error = out[1].decode_error
    assert isinstance(error, EntryDecodeError)
    assert isinstance(error.__cause__, RecursionError)
    assert "RecursionError" in str(error)


def test_an_unforeseen_failure_while_decoding_makes_the_entry_poison() -> None:
    """Any exception while decoding one entry (here a field map that breaks mid-iteration) is
    turned into a poison message instead of escaping."""

    class Hostile(dict[bytes, bytes]):
        def items(self) -> Any:
            raise MemoryError("no room")

    message = decode_entry("s", b"5-0", Hostile({b"data": b"{}", b"h:x": b"1"}), "g", 3, None)
    assert isinstance(message.decode_error, EntryDecodeError)
    assert isinstance(message.decode_error.__cause__, MemoryError)
    assert message.raw == b"{}"
    assert message.delivery_count == 3
    assert message.enqueued_at == 0.005


# -- the reader, against a real Redis --------------------------------------------------------


async def _round_trip(url: str, entries: list[dict[bytes, bytes]]) -> None:
    stream = f"abe-test:{uuid.uuid4().hex[:12]}:hostile"
    client = aioredis.Redis.from_url(url)
    backend = RedisBackend(url, streams=[stream], group="g", consumer="c", batch_size=64)
    try:
        ids = [await client.xadd(stream, fields) for fields in entries]  # type: ignore[arg-type]
        rows: Any = await client.xrange(stream)
        stored: list[dict[bytes, bytes]] = [dict(f) for _, f in rows]  # duplicates: last wins
        got: list[InboundMessage] = []
        deliveries = backend.deliveries()
        try:
            async with asyncio.timeout(30):
                async for message in deliveries:
                    got.append(message)
                    await backend.ack(message)
                    if len(got) == len(entries):
                        break
        finally:
            await closable(deliveries).aclose()
        assert [m.message_id for m in got] == [bytes(i).decode() for i in ids]  # type: ignore[arg-type]
        for message, fields in zip(got, stored, strict=True):
            check_message(message, fields)
        assert backend.stats.poison == sum(m.decode_error is not None for m in got)
        assert await backend.pending() == 0
    finally:
        await backend.aclose()
        await client.delete(stream)
        await client.aclose()


@pytest.mark.broker
@given(st.lists(field_maps().filter(bool), min_size=1, max_size=5))
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_the_reader_hands_out_every_entry_whatever_it_holds(
    redis_url: str, entries: list[dict[bytes, bytes]]
) -> None:
    """Entries with arbitrary fields, bytes, sizes and nesting, written to a real Redis, are each
    delivered once by the reader (decoded or poison) and can all be acknowledged."""
    asyncio.run(_round_trip(redis_url, entries))
