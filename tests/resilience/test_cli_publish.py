"""``resilience publish DEST JSON``: test messages through load_backend()'s backend."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.cli import CliError, main
from resilience.cli.publish import parse_headers, parse_payloads


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """QUEUE_BACKEND=memory and an empty shared in-memory queue for every test."""
    for name in list(os.environ):
        if name.startswith(("QUEUE_", "REDIS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    MemoryBackend.reset_shared()
    yield
    MemoryBackend.reset_shared()


def test_publish_puts_each_json_object_on_the_destination(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every JSON argument becomes one message on DEST, in order, and the ids are printed."""
    code = main(["publish", "orders", '{"order": 1}', '{"order": 2, "kind": "slow"}'])
    assert code == 0
    assert [m.payload for m in MemoryBackend().peek("orders")] == [
        {"order": 1},
        {"order": 2, "kind": "slow"},
    ]
    out = capsys.readouterr().out
    assert "published 2 message(s) to 'orders' via MemoryBackend" in out


def test_publish_sends_headers(capsys: pytest.CaptureFixture[str]) -> None:
    """--header NAME=VALUE travels with every message of a header-carrying backend."""
    code = main(
        ["publish", "orders", "{}", "--header", "traceparent=00-ab-cd-01", "--header", "x=1=2"]
    )
    assert code == 0
    [message] = MemoryBackend().peek("orders")
    assert dict(message.headers) == {"traceparent": "00-ab-cd-01", "x": "1=2"}


def test_publish_reads_json_lines_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """'-' reads one JSON object per non-blank stdin line."""
    monkeypatch.setattr("sys.stdin", io.StringIO('{"n": 1}\n\n{"n": 2}\n'))
    assert main(["publish", "jobs", "-"]) == 0
    assert [m.payload for m in MemoryBackend().peek("jobs")] == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[1, 2]", "JSON argument 2 must be a JSON object"),
        ("{order: 1}", "JSON argument 2 is not valid JSON"),
        ('"text"', "got str"),
    ],
)
def test_publish_rejects_what_is_not_a_json_object(
    value: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value that is not a JSON object is a one-line error (exit 2) and nothing is published."""
    assert main(["publish", "orders", '{"ok": 1}', value]) == 2
    assert expected in capsys.readouterr().err
    assert MemoryBackend().size() == 0


def test_publish_refuses_the_in_process_fallback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without QUEUE_BACKEND the message would vanish with the command: exit 2 naming it."""
    monkeypatch.delenv("QUEUE_BACKEND")
    assert main(["publish", "orders", '{"order": 1}']) == 2
    err = capsys.readouterr().err
    assert "set QUEUE_BACKEND" in err
    assert MemoryBackend().size() == 0


def test_publish_names_an_unknown_backend(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown QUEUE_BACKEND is a one-line error naming the installed providers."""
    monkeypatch.setenv("QUEUE_BACKEND", "no-such-broker")
    assert main(["publish", "orders", "{}"]) == 2
    err = capsys.readouterr().err
    assert "no-such-broker" in err
    assert "memory" in err


def test_parse_headers_rejects_a_value_without_a_name() -> None:
    """A --header without NAME= is refused with the value in the message."""
    with pytest.raises(CliError, match="NAME=VALUE, got 'novalue'"):
        parse_headers(["novalue"])
    with pytest.raises(CliError, match="NAME=VALUE"):
        parse_headers(["=x"])


def test_parse_payloads_numbers_stdin_lines() -> None:
    """A bad stdin line is reported by its line number."""
    with pytest.raises(CliError, match="stdin line 2"):
        parse_payloads(["-"], stdin=io.StringIO('{"a": 1}\nnope\n'))
