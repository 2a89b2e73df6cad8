"""The ``resilience dlq`` round trip on dead letters kept on a broker (shared by the RabbitMQ
and NATS tests): dead-letter through the backend, list, show, replay, purge."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from resilience.cli import main
from resilience.dead_letter import EnvelopeBuilder
from resilience.delivery import Delivery

MakeBackend = Callable[[], Any]


def dead_letter_two(make: MakeBackend, key: str) -> list[str]:
    """Publish two messages to ``key``, dead-letter both through the backend; their ids."""
    builder = EnvelopeBuilder(system="broker", handler_name="app:handle")

    async def go() -> list[str]:
        backend = make()
        try:
            for n in range(2):
                await backend.publish_message(key, {"order": n}, headers={"x-tenant": "t1"})
            stream = backend.deliveries()
            ids = []
            for n in range(2):
                message = await asyncio.wait_for(anext(stream), 10)
                delivery = Delivery(
                    message.payload,
                    key=message.key,
                    message_id=message.message_id,
                    headers=dict(message.headers),
                )
                exc = ValueError(f"bad order {n}") if n == 0 else ConnectionError("reset")
                reason = "non_retryable" if n == 0 else "retries_exhausted"
                envelope = builder.build(
                    delivery, exc, reason=reason, stage="handle", monotonic_now=0.0
                )
                await backend.dead_letter(message, f"{key}.dlq", envelope)
                ids.append(envelope["id"])
            await backend.flush()
            await stream.aclose()
            return ids
        finally:
            await backend.aclose()

    return asyncio.run(go())


def take_replayed(make: MakeBackend) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Consume what the replay published: (payload, headers) of one message."""

    async def go() -> list[tuple[dict[str, Any], dict[str, str]]]:
        backend = make()
        try:
            stream = backend.deliveries()
            message = await asyncio.wait_for(anext(stream), 10)
            await backend.ack(message)
            await backend.flush()
            await stream.aclose()
            return [(message.payload, dict(message.headers))]
        finally:
            await backend.aclose()

    return asyncio.run(go())


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``resilience dlq ARGV`` in-process: (exit code, stdout)."""
    code = main(["dlq", *argv])
    out, _ = capsys.readouterr()
    return code, out


def round_trip(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    make: MakeBackend,
    key: str,
    store: str,
    env: dict[str, str],
) -> None:
    """list, show, replay one (it comes back on ``key`` with replay headers), purge the rest."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ids = dead_letter_two(make, key)

    code, out = run(capsys, "list", "--store", store, "--json")
    assert code == 0
    listed = json.loads(out)
    assert [r["id"] for r in listed] == ids
    assert [r["envelope"]["error"]["reason"] for r in listed] == [
        "non_retryable",
        "retries_exhausted",
    ]

    code, out = run(capsys, "show", ids[0][:10], "--store", store, "--json")
    assert code == 0
    assert json.loads(out)["envelope"]["payload"] == {"order": 0}

    code, out = run(capsys, "replay", "--store", store, "--id", ids[0], "--json")
    assert code == 0, out
    assert json.loads(out)["replayed"] == [{"id": ids[0], "key": key}]
    ((payload, headers),) = take_replayed(make)
    assert payload == {"order": 0}
    assert headers["x-replay-count"] == "1"
    assert headers["x-replay-of"] == ids[0]
    assert headers["x-tenant"] == "t1"

    code, out = run(capsys, "list", "--store", store, "--replayed", "--json")
    assert [r["id"] for r in json.loads(out)] == [ids[0]]
    assert json.loads(out)[0]["replay_target"] == key

    code, out = run(capsys, "purge", "--store", store, "--yes")
    assert (code, out.strip()) == (0, "Purged 2 dead letter(s).")
    code, out = run(capsys, "list", "--store", store, "--json")
    assert json.loads(out) == []
