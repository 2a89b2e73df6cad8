"""NATSBackend under faults, against real NATS servers: SIGKILLed consumers, a restart of a
test-owned server mid-drain, a crash between dead-letter publish and term, delayed
redelivery, long work kept alive."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from abe.backends.message_queue.base import DeadLetteringBackend, DelayingBackend
from abe.backends.message_queue.service.nats import NATSBackend
from resilience.consumer import ResilientConsumer
from tests.broker_processes import recorded, start_worker, stop_all, wait_ready
from tests.nats.nats_support import Names, NATSServer, eventually

pytestmark = pytest.mark.broker


async def _stored(url: str, stream: str, subject: str) -> list[Any]:
    """The messages of ``subject`` stored in ``stream`` (read with an ephemeral consumer)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            if msg.subject == subject:
                out.append(msg)
        return out
    finally:
        await nc.close()


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes started by the test; any still running are killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    stop_all(started)


@pytest.mark.slow
async def test_sigkilled_consumer_mid_batch_loses_nothing(
    nats_url: str,
    make_backend: Any,
    names: Names,
    tmp_path: Path,
    workers: list[subprocess.Popen[str]],
) -> None:
    """Two consumer processes share a durable consumer; one is SIGKILLed holding a fetched
    batch: after ack_wait the server redelivers its messages to the other, none is lost."""
    subject = names.subject()
    record = tmp_path / "record.txt"
    publisher: NATSBackend = make_backend(ack_wait=1)
    await publisher.publish(subject, {"n": -1})  # creates the stream
    env = {
        "QUEUE_BACKEND": "nats",
        "NATS_URL": nats_url,
        "NATS_STREAM": names.stream,
        "NATS_SUBJECTS": subject,
        "NATS_DEAD_LETTER_STREAM": names.dead_letter_stream,
        "NATS_ACK_WAIT": "1",
        "NATS_BATCH_SIZE": "50",
    }
    doomed = start_worker("doomed", str(record), "--stall-after", "40", env=env)
    live = start_worker("live", str(record), "--work", "0.002", env=env)
    workers.extend((doomed, live))
    for worker in workers:
        wait_ready(worker)
    total = 600
    await publisher.publish_many(subject, [{"n": n} for n in range(total)])

    async def doomed_stalled() -> bool:
        if not record.exists():
            return False
        return sum(1 for x in record.read_text().splitlines() if x.startswith("doomed")) >= 40

    await eventually(doomed_stalled, timeout=20, what="the doomed worker to handle 40")
    doomed.send_signal(signal.SIGKILL)

    async def all_done() -> bool:
        return set(recorded(record)) >= set(range(-1, total))

    await eventually(all_done, timeout=60, what="every message to be processed")
    live.send_signal(signal.SIGTERM)
    _, err = live.communicate(timeout=20)
    assert live.returncode == 0, err
    assert doomed.wait(10) == -signal.SIGKILL

    async def settled() -> bool:
        return await publisher.pending() == 0

    await eventually(settled, timeout=10, what="nothing pending in the durable consumer")


async def test_server_restart_mid_drain_loses_nothing_and_resumes(
    nats_server: NATSServer, names: Names
) -> None:
    """The (test-owned) server is restarted mid-drain: the client reconnects by itself,
    fetching resumes, and every message is processed (duplicates allowed, none lost)."""
    subject = names.subject()
    kwargs: dict[str, Any] = {
        "stream": names.stream,
        "subjects": [subject],
        "dead_letter_stream": names.dead_letter_stream,
        "block": 0.5,
        "ack_wait": 2,
    }
    publisher = NATSBackend(nats_server.url, **kwargs)
    consumer_backend = NATSBackend(nats_server.url, batch_size=50, **kwargs)
    total = 1000
    await publisher.publish_many(subject, [{"n": n} for n in range(total)])
    await publisher.aclose()
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["n"])
        await asyncio.sleep(0)

    consumer = ResilientConsumer(consumer_backend, concurrency=4, drain_timeout=5)
    run = asyncio.create_task(consumer.run(handler))
    try:

        async def started() -> bool:
            return len(seen) >= 200

        await eventually(started, what="200 messages before the restart")
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(nats_server.start)

        async def finished() -> bool:
            return len(set(seen)) == total

        await eventually(finished, timeout=60, what="every message after the restart")
    finally:
        await consumer.shutdown()
        await run
        await consumer_backend.aclose()
    assert set(seen) == set(range(total))


async def test_dead_letter_is_acknowledged_then_the_original_terminated(
    nats_url: str, make_backend: Any, names: Names
) -> None:
    """dead_letter() stores the record, with the message's headers, under <subject>.dlq in the
    dead-letter stream and terminates the original: it is never delivered again."""
    subject = names.subject()
    backend: NATSBackend = make_backend(ack_wait=1)
    assert isinstance(backend, DeadLetteringBackend)
    await backend.publish_message(subject, {"n": 1}, headers={"traceparent": "00-abc-def-01"})
    await backend.publish(subject, {"n": 2})
    stream = backend.deliveries()
    message = await asyncio.wait_for(anext(stream), 5)
    record = {"id": "env-1", "payload": message.payload}
    await backend.dead_letter(message, f"{subject}.dlq", record)
    following = await asyncio.wait_for(anext(stream), 5)
    await backend.ack(following)
    await backend.flush()
    await stream.aclose()
    dead = await _stored(nats_url, names.dead_letter_stream, f"{subject}.dlq")
    assert [json.loads(m.data) for m in dead] == [record]
    assert dead[0].headers is not None
    assert dead[0].headers["traceparent"] == "00-abc-def-01"
    assert following.payload == {"n": 2}

    async def settled() -> bool:
        return await backend.pending() == 0

    await eventually(settled, timeout=5, what="nothing pending")


async def test_crash_between_dead_letter_publish_and_term_duplicates_never_loses(
    nats_url: str, make_backend: Any, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that dies after the dead letter is stored and before term() leaves the
    original to be redelivered; dead-lettering it again stores no second record (same id)."""
    subject = names.subject()
    doomed: NATSBackend = make_backend(ack_wait=1)
    await doomed.publish(subject, {"n": 7})
    stream = doomed.deliveries()
    message = await asyncio.wait_for(anext(stream), 5)

    async def crash(*args: Any, **kwargs: Any) -> None:
        return None  # the process dies before term() reaches the server

    monkeypatch.setattr(message.handle, "term", crash)
    await doomed.dead_letter(message, f"{subject}.dlq", {"id": "env-7", "payload": {"n": 7}})
    await doomed.aclose()

    survivor: NATSBackend = make_backend(ack_wait=1)
    again_stream = survivor.deliveries()
    again = await asyncio.wait_for(anext(again_stream), 10)
    await survivor.dead_letter(again, f"{subject}.dlq", {"id": "env-7", "payload": {"n": 7}})
    await survivor.flush()
    await again_stream.aclose()
    assert (again.payload, again.message_id) == ({"n": 7}, message.message_id)
    assert again.delivery_count == 2
    dead = await _stored(nats_url, names.dead_letter_stream, f"{subject}.dlq")
    assert [json.loads(m.data)["id"] for m in dead] == ["env-7"]


async def test_release_later_waits_in_the_server_with_the_slot_free(
    make_backend: Any, names: Names
) -> None:
    """release_later() is nak(delay): the next message is handed out at once and the delayed
    one comes back after the delay, as the same message with a higher delivery count."""
    subject = names.subject()
    backend: NATSBackend = make_backend(batch_size=1)
    assert isinstance(backend, DelayingBackend)
    await backend.publish_message(subject, {"n": 1}, headers={"traceparent": "00-t-s-01"})
    await backend.publish(subject, {"n": 2})
    stream = backend.deliveries()
    first = await asyncio.wait_for(anext(stream), 5)
    started = time.monotonic()
    await backend.release_later(first, 0.4)
    second = await asyncio.wait_for(anext(stream), 5)
    assert second.payload == {"n": 2}
    assert time.monotonic() - started < 0.4  # not held up by the delayed one
    await backend.ack(second)
    again = await asyncio.wait_for(anext(stream), 5)
    waited = time.monotonic() - started
    await backend.ack(again)
    await backend.flush()
    await stream.aclose()
    assert (again.payload, again.message_id) == ({"n": 1}, first.message_id)
    assert again.delivery_count == 2
    assert again.headers == {"traceparent": "00-t-s-01"}
    assert waited >= 0.35


async def test_held_messages_are_kept_alive_past_ack_wait(make_backend: Any, names: Names) -> None:
    """A message held longer than ack_wait by a live consumer is kept alive (in_progress) and
    not redelivered to another consumer of the same durable."""
    subject = names.subject()
    holder: NATSBackend = make_backend(ack_wait=1)
    other: NATSBackend = make_backend(ack_wait=1)
    await holder.publish(subject, {"n": 1})
    held_stream = holder.deliveries()
    held = await asyncio.wait_for(anext(held_stream), 5)
    other_stream = other.deliveries()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(other_stream), 2.5)  # 2.5 x ack_wait
    await holder.ack(held)
    await holder.flush()
    await held_stream.aclose()
    await other_stream.aclose()
    assert held.delivery_count == 1

    async def settled() -> bool:
        return await holder.pending() == 0

    await eventually(settled, timeout=5, what="the held message to be acknowledged")


async def test_release_redelivers_at_once_with_a_higher_count(
    make_backend: Any, names: Names
) -> None:
    """release() (nak) brings the same message back with delivery_count + 1."""
    subject = names.subject()
    backend: NATSBackend = make_backend()
    await backend.publish(subject, {"n": 1})
    stream = backend.deliveries()
    counts = []
    for _ in range(3):
        message = await asyncio.wait_for(anext(stream), 5)
        counts.append(message.delivery_count)
        await backend.release(message)
    await stream.aclose()
    assert counts == [1, 2, 3]


async def test_publishing_to_a_subject_no_stream_captures_is_a_clear_error(
    make_backend: Any, names: Names
) -> None:
    """A subject outside every stream fails with NATSBackendError saying so (not "unavailable")."""
    from abe.backends.message_queue.service.nats import NATSBackendError, NATSUnavailableError

    backend: NATSBackend = make_backend()
    await backend.publish(names.subject(), {"n": 1})  # creates the stream
    with pytest.raises(NATSBackendError, match="no JetStream stream captures") as info:
        await backend.publish(f"{names.prefix}-elsewhere", {"n": 2})
    assert not isinstance(info.value, NATSUnavailableError)


async def test_a_deleted_durable_consumer_is_recreated_and_reading_resumes(
    nats_url: str, make_backend: Any, names: Names
) -> None:
    """The durable consumer is deleted under a live reader: its pull requests are refused, it
    backs off, creates the consumer again and hands out the messages published afterwards."""
    subject = names.subject()
    backend: NATSBackend = make_backend(block=0.5)
    await backend.publish(subject, {"n": 0})
    stream = backend.deliveries()
    first = await asyncio.wait_for(anext(stream), 5)
    await backend.ack(first)
    await backend.flush()
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_consumer(names.stream, backend.settings.durable)
    finally:
        await nc.close()
    await backend.publish(subject, {"n": 1})
    seen = []
    while 1 not in seen:
        message = await asyncio.wait_for(anext(stream), 15)
        seen.append(message.payload["n"])
        await backend.ack(message)
    await backend.flush()
    await stream.aclose()
    assert first.payload == {"n": 0}
    assert set(seen) <= {0, 1}  # the new consumer starts from the first message again
