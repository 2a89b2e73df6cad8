"""Broker throughput on RabbitMQ and NATS JetStream: the full pipeline against a hand-written
best-practice loop for the same client, in the same run.

For each broker every contender drains the same number of pre-published messages (JSON
``{"n": n, "body": "x" * 64}``) from a fresh queue or stream, decoding each payload, awaiting a
handler that does nothing, and acknowledging it:

* ``ResilientConsumer``: :class:`~resilience.consumer.ResilientConsumer` with the full default
  pipeline over the project's backend (at-least-once: acknowledged after the handler).
* ``hand-written``: the client's recommended loop, tuned: for aio-pika a consume callback
  with a ``basic.qos`` prefetch and one ``multiple`` ack per 100 messages; for nats-py a pull
  consumer fetching 500 at a time with explicit acks (what the backend uses: each message
  settles on its own).
* ``hand-written, inbox callback`` (NATS only): pull requests published by hand to an inbox
  subscription whose callback handles and acknowledges each message, as the backend reads (no
  ``fetch()``, which starts a task and a timer per message); shown for reference.
* ``hand-written, AckAll`` (NATS only): the same loop on an ``AckAll`` consumer, one ack per
  batch; shown for reference (it cannot settle messages out of order, so the backend does not
  use it).

Rounds are interleaved (the order rotates each round) and the best rate of each contender is
kept. The Redis rows come from :mod:`.redis_throughput`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from resilience.consumer import ResilientConsumer

from ._contenders import full_pipeline_policy
from ._drain import counting_handler, until_handled
from .report import format_table, machine_info, quiet_policy_advice

__all__ = ["BROKERS", "BrokerUnavailable", "format_brokers", "measure_brokers"]

BROKERS = ("redis", "rabbitmq", "nats")
"""The brokers ``bench brokers`` knows."""

TARGET = 0.9
"""The full pipeline should drain at least this share of the hand-written loop's rate."""

WARMUP = 1000
SHUTDOWN_LIMIT = 5.0

Progress = Callable[[int, int, str, float], None]
Runner = Callable[[str, str, int], Awaitable[float]]
"""``(url, name, messages) -> seconds``: drain ``messages`` from queue or stream ``name``."""


class BrokerUnavailable(RuntimeError):
    """A broker did not answer (or its client library is not installed)."""


def _body(n: int) -> bytes:
    return json.dumps({"n": n, "body": "x" * 64}).encode()


async def _noop(payload: dict[str, Any]) -> None:
    return None


LEFTOVER_SETTLE = 2.0
"""Seconds a broker may take to apply acknowledgements already sent before the bench counts
the messages still unacknowledged."""


async def _drain_resilient(backend: Any, messages: int) -> float:
    consumer = ResilientConsumer(
        backend, policy=full_pipeline_policy(), drain_timeout=SHUTDOWN_LIMIT
    )
    handler, done = counting_handler(messages)

    started = time.perf_counter()
    task = asyncio.create_task(consumer.run(handler))
    try:
        await until_handled(task, done, backend.flush)
        elapsed = time.perf_counter() - started
    finally:
        await consumer.shutdown()
        await asyncio.gather(task, return_exceptions=True)
        await backend.aclose()
    return elapsed


# -- RabbitMQ ----------------------------------------------------------------------------------


class _RabbitMQ:
    name = "rabbitmq"
    default_url = "amqp://guest:guest@127.0.0.1:5672/"
    prefetch = 500

    async def check(self, url: str) -> str:
        try:
            import aio_pika
        except ImportError as exc:
            raise BrokerUnavailable(f"aio-pika is not installed: {exc}") from None
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except Exception as exc:
            raise BrokerUnavailable(f"RabbitMQ at {url} does not answer: {exc}") from None
        props = connection.transport.connection.server_properties if connection.transport else {}
        await connection.close()
        version = props.get("version", "?") if isinstance(props, dict) else "?"
        return f"RabbitMQ {version!s}"

    async def prefill(self, url: str, name: str, messages: int) -> None:
        from abe.backends.message_queue.service.rabbitmq import RabbitMQBackend

        backend = RabbitMQBackend(url, queues=[name])
        try:
            for start in range(0, messages, 5000):
                count = min(messages, start + 5000) - start
                await backend.publish_many(
                    name, [{"n": n, "body": "x" * 64} for n in range(start, start + count)]
                )
        finally:
            await backend.aclose()

    async def cleanup(self, url: str, name: str) -> None:
        import aio_pika

        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        finally:
            await connection.close()

    async def leftover(self, url: str, name: str) -> int:
        import aio_pika

        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(name, passive=True)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await connection.close()

    async def resilient(self, url: str, name: str, messages: int) -> float:
        from abe.backends.message_queue.service.rabbitmq import RabbitMQBackend

        backend = RabbitMQBackend(url, queues=[name], prefetch=self.prefetch)
        return await _drain_resilient(backend, messages)

    async def hand_written(self, url: str, name: str, messages: int) -> float:
        import aio_pika

        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            done = asyncio.get_running_loop().create_future()
            handled = 0

            async def on_message(message: Any) -> None:
                nonlocal handled
                await _noop(json.loads(message.body))
                handled += 1
                if handled % 100 == 0 or handled == messages:
                    await message.ack(multiple=True)
                if handled == messages and not done.done():
                    done.set_result(None)

            started = time.perf_counter()
            tag = await queue.consume(on_message)
            await done
            elapsed = time.perf_counter() - started
            await queue.cancel(tag)
            return elapsed
        finally:
            await connection.close()

    def contenders(self) -> list[tuple[str, str, Runner]]:
        return [
            (
                "ResilientConsumer",
                f"full default pipeline, RabbitMQBackend prefetch={self.prefetch}, quorum "
                "queue, batched acks",
                self.resilient,
            ),
            (
                "hand-written",
                f"aio-pika consume callback, prefetch={self.prefetch}, one multiple ack per 100",
                self.hand_written,
            ),
        ]


# -- NATS --------------------------------------------------------------------------------------


class _NATS:
    name = "nats"
    default_url = "nats://127.0.0.1:4222"
    batch = 500

    async def check(self, url: str) -> str:
        try:
            import nats
        except ImportError as exc:
            raise BrokerUnavailable(f"nats-py is not installed: {exc}") from None
        try:
            nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        except Exception as exc:
            raise BrokerUnavailable(f"NATS at {url} does not answer: {exc}") from None
        v = nc.connected_server_version
        await nc.close()
        return f"NATS {v.major}.{v.minor}.{v.patch}"

    @staticmethod
    def _stream(name: str) -> str:
        return name.replace(".", "_").replace(":", "_")

    async def prefill(self, url: str, name: str, messages: int) -> None:
        from abe.backends.message_queue.service.nats import NATSBackend

        backend = NATSBackend(url, stream=self._stream(name), subjects=[name])
        try:
            for start in range(0, messages, 5000):
                count = min(messages, start + 5000) - start
                await backend.publish_many(
                    name, [{"n": n, "body": "x" * 64} for n in range(start, start + count)]
                )
        finally:
            await backend.aclose()

    async def cleanup(self, url: str, name: str) -> None:
        import nats

        nc = await nats.connect(url)
        try:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(self._stream(name))
        finally:
            await nc.close()

    async def leftover(self, url: str, name: str) -> int:
        import nats

        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            # The server applies acknowledgements asynchronously, after the client has flushed
            # them: ask again for up to LEFTOVER_SETTLE seconds before calling a count left over.
            deadline = time.monotonic() + LEFTOVER_SETTLE
            while True:
                total = 0
                for info in await js.consumers_info(self._stream(name)):
                    total += int(info.num_pending or 0) + int(info.num_ack_pending or 0)
                if total == 0 or time.monotonic() >= deadline:
                    return total
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    async def resilient(self, url: str, name: str, messages: int) -> float:
        from abe.backends.message_queue.service.nats import NATSBackend

        backend = NATSBackend(
            url, stream=self._stream(name), subjects=[name], batch_size=self.batch, block=1
        )
        return await _drain_resilient(backend, messages)

    async def _hand(self, url: str, name: str, messages: int, ack_all: bool) -> float:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig

        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            durable = "hand_all" if ack_all else "hand"
            config = ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.ALL if ack_all else AckPolicy.EXPLICIT,
                max_ack_pending=10 * self.batch,
            )
            await js.add_consumer(self._stream(name), config)
            sub = await js.pull_subscribe_bind(durable, stream=self._stream(name))
            started = time.perf_counter()
            handled = 0
            while handled < messages:
                try:
                    msgs = await sub.fetch(self.batch, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await _noop(json.loads(msg.data))
                    if not ack_all:
                        await msg.ack()
                if ack_all:
                    await msgs[-1].ack()
                handled += len(msgs)
            await nc.flush()
            return time.perf_counter() - started
        finally:
            await nc.close()

    async def hand_written(self, url: str, name: str, messages: int) -> float:
        return await self._hand(url, name, messages, ack_all=False)

    async def hand_written_inbox(self, url: str, name: str, messages: int) -> float:
        """Pull requests sent by hand to an inbox with a callback (no ``fetch()``)."""
        import nats
        from nats.js.api import DEFAULT_PREFIX, AckPolicy, ConsumerConfig

        nc = await nats.connect(url)
        try:
            stream = self._stream(name)
            config = ConsumerConfig(
                durable_name="hand_inbox",
                ack_policy=AckPolicy.EXPLICIT,
                max_ack_pending=10 * self.batch,
            )
            await nc.jetstream().add_consumer(stream, config)
            subject = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.hand_inbox"
            request = json.dumps({"batch": self.batch, "expires": 1_000_000_000}).encode()
            inbox = nc.new_inbox()
            done = asyncio.get_running_loop().create_future()
            handled = 0
            owed = 0

            async def on_msg(msg: Any) -> None:
                nonlocal handled, owed
                if not msg.reply:  # the server's status: the request is over
                    owed = 0
                else:
                    owed -= 1
                    await _noop(json.loads(msg.data))
                    await msg.ack()
                    handled += 1
                    if handled == messages:
                        done.set_result(None)
                        return
                if owed <= 0:
                    owed = self.batch
                    await nc.publish(subject, request, reply=inbox)

            await nc.subscribe(inbox, cb=on_msg)
            started = time.perf_counter()
            owed = self.batch
            await nc.publish(subject, request, reply=inbox)
            await done
            await nc.flush()
            return time.perf_counter() - started
        finally:
            await nc.close()

    async def hand_written_ack_all(self, url: str, name: str, messages: int) -> float:
        return await self._hand(url, name, messages, ack_all=True)

    def contenders(self) -> list[tuple[str, str, Runner]]:
        return [
            (
                "ResilientConsumer",
                f"full default pipeline, NATSBackend batch_size={self.batch}, explicit acks",
                self.resilient,
            ),
            (
                "hand-written",
                f"nats-py pull consumer, fetch({self.batch}), explicit ack per message",
                self.hand_written,
            ),
            (
                "hand-written, inbox callback",
                f"pull requests of {self.batch} sent by hand to an inbox subscription with a "
                "callback (no fetch()), explicit ack per message",
                self.hand_written_inbox,
            ),
            (
                "hand-written, AckAll",
                f"the same on an AckAll consumer: one ack per fetch of {self.batch}",
                self.hand_written_ack_all,
            ),
        ]


_BROKER_CLASSES: dict[str, Any] = {"rabbitmq": _RabbitMQ, "nats": _NATS}


async def _measure_one(
    broker: Any, url: str, messages: int, rounds: int, progress: Progress | None
) -> dict[str, Any]:
    server = await broker.check(url)
    contenders = broker.contenders()
    best: dict[str, float] = {}
    leftovers: dict[str, int] = {}
    total = rounds * len(contenders)
    step = 0
    warmup = min(messages, WARMUP)
    for _, _, run in contenders:
        name = f"resilience-bench.{uuid.uuid4().hex[:12]}"
        try:
            await broker.prefill(url, name, warmup)
            await run(url, name, warmup)
        finally:
            await broker.cleanup(url, name)
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for label, _, run in order:
            if progress is not None:
                progress(step, total, f"{broker.name} round {r + 1}: {label}", step / total)
            name = f"resilience-bench.{uuid.uuid4().hex[:12]}"
            try:
                await broker.prefill(url, name, messages)
                elapsed = await run(url, name, messages)
                leftovers[label] = max(leftovers.get(label, 0), await broker.leftover(url, name))
            finally:
                await broker.cleanup(url, name)
            best[label] = max(best.get(label, 0.0), messages / elapsed)
            step += 1
    hand = best.get("hand-written")
    ours = best.get("ResilientConsumer")
    ratios = []
    if hand and ours:
        value = ours / hand
        ratios.append(
            {
                "name": "ResilientConsumer / hand-written",
                "value": value,
                "target": f">= {TARGET:.2f}",
                "met": value >= TARGET,
            }
        )
    return {
        "server": server,
        "url": url,
        "messages_per_second": best,
        "descriptions": {label: why for label, why, _ in contenders},
        "unacknowledged_after_drain": leftovers,
        "ratios": ratios,
    }


def measure_brokers(
    *,
    brokers: tuple[str, ...] = BROKERS,
    urls: dict[str, str] | None = None,
    messages: int = 100_000,
    rounds: int = 3,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Drain ``messages`` through every contender on each broker, ``rounds`` times each.

    Args:
        brokers: Which of :data:`BROKERS` to measure.
        urls: Broker URLs by name (defaults: the local brokers; for Redis, see
            :func:`~resilience.bench.redis_throughput.measure_throughput`).
        messages: Messages per drain.
        rounds: Drains per contender (the best rate is kept).
        progress: Called with (steps done, steps in all, label, fraction).

    Returns:
        A JSON-ready document: per broker, messages per second per contender and the ratio
        of the full pipeline to the hand-written loop. A broker that does not answer is
        listed under ``unavailable`` with the reason.

    Raises:
        ValueError: an unknown broker, or ``messages``/``rounds`` below 1.
    """
    unknown = [b for b in brokers if b not in BROKERS]
    if unknown:
        raise ValueError(f"unknown broker(s) {unknown}: choose from {', '.join(BROKERS)}")
    if messages < 1 or rounds < 1:
        raise ValueError("messages and rounds must be >= 1")
    urls = urls or {}
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name in brokers:
        if name == "redis":
            from .redis_throughput import RedisUnavailable, measure_throughput

            try:
                results[name] = measure_throughput(
                    url=urls.get("redis"), messages=messages, rounds=rounds, progress=progress
                )
            except RedisUnavailable as exc:
                unavailable[name] = str(exc)
            continue
        broker = _BROKER_CLASSES[name]()
        url = urls.get(name) or broker.default_url
        try:
            with quiet_policy_advice():
                results[name] = asyncio.run(_measure_one(broker, url, messages, rounds, progress))
        except BrokerUnavailable as exc:
            unavailable[name] = str(exc)
    return {
        "benchmark": "brokers",
        "messages": messages,
        "rounds": rounds,
        "machine": machine_info(),
        "brokers": results,
        "unavailable": unavailable,
    }


def format_brokers(report: dict[str, Any]) -> str:
    """The brokers report for the terminal: one table of every contender, then the ratios."""
    rows = []
    ratio_rows = []
    for broker, result in report["brokers"].items():
        rates: dict[str, float] = result["messages_per_second"]
        hand = rates.get("hand-written")
        for name, rate in rates.items():
            rows.append(
                [
                    broker,
                    name,
                    f"{rate:,.0f}",
                    f"{rate / hand:.2f}x" if hand else "-",
                    str(result["unacknowledged_after_drain"].get(name, "-")),
                ]
            )
        for r in result["ratios"]:
            ratio_rows.append(
                [broker, r["name"], f"{r['value']:.2f}", r["target"], "yes" if r["met"] else "NO"]
            )
    for broker, why in report["unavailable"].items():
        rows.append([broker, "unavailable", why, "", ""])
    parts = [
        f"{report['messages']:,} messages per drain, best of {report['rounds']} interleaved "
        "rounds, every contender in this one run",
        "",
        format_table(("broker", "contender", "msg/s", "vs hand-written", "unacked after"), rows),
    ]
    if ratio_rows:
        parts += ["", format_table(("broker", "ratio", "value", "target", "met"), ratio_rows)]
    return "\n".join(parts)
