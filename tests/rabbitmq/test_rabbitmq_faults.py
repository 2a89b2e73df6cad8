"""RabbitMQBackend under faults, against a real RabbitMQ: SIGKILLed consumers, a cut
connection mid-drain, a crash between dead-letter publish and ack, delayed redelivery."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from abe.backends.message_queue.base import DeadLetteringBackend, DelayingBackend
from abe.backends.message_queue.service.rabbitmq import RabbitMQBackend
from resilience.consumer import ResilientConsumer
from tests.broker_processes import recorded, start_worker, stop_all, wait_ready
from tests.consume_stream import closable
from tests.rabbitmq.rabbitmq_support import Queues
from tests.rabbitmq.tcp_proxy import TCPProxy

pytestmark = pytest.mark.broker


async def _eventually(check: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _drain_queue(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now ready in ``queue``, taken with basic.get and acknowledged."""
    connection = await aio_pika.connect(url)
    taken = []
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        while (message := await q.get(fail=False)) is not None:
            await message.ack()
            taken.append(message)
    finally:
        await connection.close()
    return taken


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes started by the test; any still running are killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    stop_all(started)


@pytest.mark.slow
async def test_sigkilled_consumer_mid_batch_loses_nothing(
    rabbitmq_url: str,
    make_backend: Any,
    queues: Queues,
    tmp_path: Path,
    workers: list[subprocess.Popen[str]],
) -> None:
    """Two consumer processes share a queue; one is SIGKILLed holding a prefetched batch: the
    broker hands its unacknowledged messages to the other, and every message is processed."""
    queue = queues("work")
    record = tmp_path / "record.txt"
    env = {
        "QUEUE_BACKEND": "rabbitmq",
        "RABBITMQ_URL": rabbitmq_url,
        "RABBITMQ_QUEUES": queue,
        "RABBITMQ_PREFETCH": "50",
        "RABBITMQ_DEAD_LETTER_EXCHANGE": queues.exchange,
    }
    doomed = start_worker("doomed", str(record), "--stall-after", "40", env=env)
    live = start_worker("live", str(record), "--work", "0.002", env=env)
    workers.extend((doomed, live))
    for worker in workers:
        wait_ready(worker)
    publisher: RabbitMQBackend = make_backend(queues=[queue])
    total = 600
    await publisher.publish_many(queue, [{"n": n} for n in range(total)])

    async def doomed_stalled() -> bool:
        return (
            sum(1 for line in record.read_text().splitlines() if line.startswith("doomed")) >= 40
            if record.exists()
            else False
        )

    await _eventually(doomed_stalled, what="the doomed worker to handle 40 messages")
    doomed.send_signal(signal.SIGKILL)

    async def all_done() -> bool:
        return set(recorded(record)) == set(range(total))

    await _eventually(all_done, timeout=60, what="every message to be processed")
    live.send_signal(signal.SIGTERM)
    _, err = live.communicate(timeout=20)
    assert live.returncode == 0, err
    assert await publisher.queue_depth(queue) == 0
    assert doomed.wait(10) == -signal.SIGKILL


async def test_connection_cut_mid_drain_loses_nothing_and_resumes(
    rabbitmq_url: str, make_backend: Any, queues: Queues
) -> None:
    """The link to the broker is cut mid-drain and restored a second later: the consumer
    reconnects by itself and every message is processed (duplicates allowed, none lost)."""
    parts = urlsplit(rabbitmq_url)
    proxy = TCPProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    queue = queues("work")
    publisher: RabbitMQBackend = make_backend(queues=[queue])
    proxied_url = rabbitmq_url.replace(f":{parts.port or 5672}", f":{proxy.port}")
    consumer_backend: RabbitMQBackend = make_backend(url=proxied_url, queues=[queue], prefetch=50)
    total = 1000
    await publisher.publish_many(queue, [{"n": n} for n in range(total)])
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["n"])
        await asyncio.sleep(0)

    consumer = ResilientConsumer(consumer_backend, concurrency=4, drain_timeout=5)
    run = asyncio.create_task(consumer.run(handler))
    try:
        await _eventually(_at_least(seen, 200), what="200 messages before the cut")
        await proxy.cut()
        await asyncio.sleep(1.0)  # the outage: nothing can reach the broker meanwhile
        await proxy.restore()
        await _eventually(
            _covers(seen, total), timeout=60, what="every message after the reconnection"
        )
    finally:
        await consumer.shutdown()
        await run
        await proxy.close()
    assert set(seen) == set(range(total))
    assert proxy.cuts == 2  # the cut, and close()


def _at_least(seen: list[int], count: int) -> Any:
    async def check() -> bool:
        return len(seen) >= count

    return check


def _covers(seen: list[int], total: int) -> Any:
    async def check() -> bool:
        return len(set(seen)) == total

    return check


async def test_dead_letter_is_confirmed_then_the_original_acked(
    rabbitmq_url: str, make_backend: Any, queues: Queues
) -> None:
    """dead_letter() puts the record, with the message's headers, in the bound dead-letter
    queue and acknowledges the original: the work queue is then empty."""
    queue = queues("work")
    backend: RabbitMQBackend = make_backend(queues=[queue])
    assert isinstance(backend, DeadLetteringBackend)
    await backend.publish_message(queue, {"n": 1}, headers={"traceparent": "00-abc-def-01"})
    stream = backend.deliveries()
    message = await asyncio.wait_for(anext(stream), 5)
    record = {"id": "env-1", "payload": message.payload, "reason": "test"}
    record_id = await backend.dead_letter(message, f"{queue}.dlq", record)
    await stream.aclose()
    assert record_id == "env-1"
    dead = await _drain_queue(rabbitmq_url, f"{queue}.dlq")
    assert [json.loads(m.body) for m in dead] == [record]
    assert dead[0].headers["traceparent"] == "00-abc-def-01"
    assert await backend.queue_depth(queue) == 0


async def test_crash_between_dead_letter_publish_and_ack_duplicates_never_loses(
    rabbitmq_url: str, make_backend: Any, queues: Queues, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that dies after the dead-letter confirm and before its ack leaves the record
    in the dead-letter queue and the original back in the work queue: a duplicate, no loss."""
    queue = queues("work")
    doomed: RabbitMQBackend = make_backend(queues=[queue])
    await doomed.publish(queue, {"n": 7})
    stream = doomed.deliveries()
    message = await asyncio.wait_for(anext(stream), 5)
    monkeypatch.setattr(doomed, "ack_nowait", lambda message: None)  # dies before the ack
    await doomed.dead_letter(message, f"{queue}.dlq", {"id": "env-7", "payload": {"n": 7}})
    await doomed.aclose()  # the connection goes, the unacknowledged delivery goes back

    survivor: RabbitMQBackend = make_backend(queues=[queue])
    again_stream = survivor.deliveries()
    again = await asyncio.wait_for(anext(again_stream), 5)
    await survivor.ack(again)
    await again_stream.aclose()
    assert (again.payload, again.message_id) == ({"n": 7}, message.message_id)
    assert again.delivery_count == 2
    dead = await _drain_queue(rabbitmq_url, f"{queue}.dlq")
    assert [json.loads(m.body)["id"] for m in dead] == ["env-7"]


async def test_release_later_waits_in_the_broker_with_the_slot_free(
    make_backend: Any, queues: Queues
) -> None:
    """release_later() moves the message to a TTL tier queue: with a prefetch of one, the
    next message is delivered at once, and the delayed one comes back after its delay with a
    higher delivery count and its headers."""
    queue = queues("work")
    backend: RabbitMQBackend = make_backend(queues=[queue], prefetch=1, delay_tiers=[0.3, 5])
    assert isinstance(backend, DelayingBackend)
    await backend.publish_message(queue, {"n": 1}, headers={"traceparent": "00-t-s-01"})
    await backend.publish(queue, {"n": 2})
    stream = backend.deliveries()
    first = await asyncio.wait_for(anext(stream), 5)
    started = time.monotonic()
    await backend.release_later(first, 0.2)  # rounded up to the 0.3 s tier
    second = await asyncio.wait_for(anext(stream), 5)
    assert second.payload == {"n": 2}
    assert await backend.queue_depth(f"{queue}.delay.300") == 1  # the broker holds the wait
    await backend.ack(second)
    again = await asyncio.wait_for(anext(stream), 5)
    waited = time.monotonic() - started
    await backend.ack(again)
    await stream.aclose()
    assert again.payload == {"n": 1}
    assert again.message_id == first.message_id
    assert again.delivery_count == first.delivery_count + 1
    assert again.headers == {"traceparent": "00-t-s-01"}
    assert waited >= 0.25


async def test_release_requeues_with_a_higher_count(make_backend: Any, queues: Queues) -> None:
    """release() (nack with requeue) brings the same message back with delivery_count + 1."""
    queue = queues("work")
    backend: RabbitMQBackend = make_backend(queues=[queue])
    await backend.publish(queue, {"n": 1})
    stream = backend.deliveries()
    counts = []
    for _ in range(3):
        message = await asyncio.wait_for(anext(stream), 5)
        counts.append(message.delivery_count)
        await backend.release(message)
    await stream.aclose()
    assert counts == [1, 2, 3]


async def test_undecodable_body_is_moved_to_the_dead_letter_queue_by_consume(
    rabbitmq_url: str, make_backend: Any, queues: Queues
) -> None:
    """consume() moves a body that is not a JSON object, untouched, to <queue>.dlq and goes
    on with the next message."""
    queue = queues("work")
    backend: RabbitMQBackend = make_backend(queues=[queue])
    await backend.publish(queue, {"n": 0})  # declares the queue
    connection = await aio_pika.connect(rabbitmq_url)
    channel = await connection.channel()
    await channel.default_exchange.publish(aio_pika.Message(b"not json"), routing_key=queue)
    await connection.close()
    await backend.publish(queue, {"n": 2})
    stream = closable(backend.consume())
    got = [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
    await stream.aclose()
    assert got == [{"n": 0}, {"n": 2}]
    dead = await _drain_queue(rabbitmq_url, f"{queue}.dlq")
    assert [m.body for m in dead] == [b"not json"]


async def test_delivery_limit_makes_the_broker_dead_letter_a_looping_message(
    rabbitmq_url: str, make_backend: Any, queues: Queues
) -> None:
    """With delivery_limit=2 a message released twice is moved by the broker itself to
    <queue>.dlq (through the dead-letter exchange), not dropped."""
    queue = queues("work")
    backend: RabbitMQBackend = make_backend(queues=[queue], delivery_limit=2)
    await backend.publish(queue, {"n": 1})
    stream = backend.deliveries()
    counts = []
    for _ in range(2):
        message = await asyncio.wait_for(anext(stream), 5)
        counts.append(message.delivery_count)
        await backend.release(message)
    await stream.aclose()

    async def moved() -> bool:
        return await backend.queue_depth(f"{queue}.dlq") == 1

    await _eventually(moved, timeout=10, what="the broker to dead-letter the message")
    dead = await _drain_queue(rabbitmq_url, f"{queue}.dlq")
    assert counts == [1, 2]
    assert [json.loads(m.body) for m in dead] == [{"n": 1}]
    assert await backend.queue_depth(queue) == 0
