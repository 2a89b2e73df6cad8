"""Cancelling a Redis reader always works, also through a client that can lose a cancellation.

redis-py sends through ``asyncio.wait_for`` when its client has a ``socket_timeout`` (5 s by
default, so any client a user creates and passes in). On Python 3.11 that loses a cancellation
arriving as the send completes; the reader must notice and stop anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis

from abe.backends.message_queue.consumer import AsyncLoopConsumer
from abe.backends.message_queue.service._redis_recovery import (
    keep_alive,
    resilient,
    unswallowed,
)
from abe.backends.message_queue.service._redis_settings import RedisSettings
from resilience.consumer import ResilientConsumer
from resilience.policy import Policy
from tests.redis.redis_support import MakeBackend


async def _lose_a_cancellation() -> None:
    """Wait until cancelled and return normally, as wait_for does when the send just completed."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


async def _swallow_then_block(started: asyncio.Event) -> None:
    """Behave like redis-py's send under wait_for on 3.11: lose one cancellation, then block."""
    started.set()
    await _lose_a_cancellation()
    await asyncio.Event().wait()  # the blocking read that follows


class _Reader:
    """The parts of a StreamReader that the recovery helpers use."""

    def __init__(self, client: Any = None) -> None:
        self.settings = RedisSettings(consumer="c", claim_idle=0.03)
        self.groups_ready = True
        self.owner: asyncio.Task[Any] | None = None
        self.cancel_baseline = 0
        self.client = client
        self.group = "g"
        self.consumer = "c"
        self.unsettled = {"s": {"1-0": b"1-0"}}

    def timeout(self, extra: float = 0.0) -> asyncio.Timeout:
        return asyncio.timeout(10 + extra)


async def _cancel_and_expect_end(task: asyncio.Task[Any], started: asyncio.Event) -> None:
    async with asyncio.timeout(2):
        await started.wait()
    task.cancel()
    # asyncio.wait, not a timeout around `await task`: a task that swallows cancellations
    # would swallow the timeout's too, and the test would hang instead of failing.
    await asyncio.wait({task}, timeout=2)
    if not task.done():
        while not task.done():  # end it so the test can report the failure
            task.cancel()
            await asyncio.sleep(0)
        pytest.fail("the task went on after being cancelled")
    assert task.cancelled()


async def test_unswallowed_cancels_a_call_again_until_it_ends() -> None:
    """A guarded call that loses the first cancellation is cancelled again, and the caller
    ends with CancelledError instead of waiting for the call."""
    started = asyncio.Event()
    call = asyncio.ensure_future(_swallow_then_block(started))

    async def caller() -> None:
        await unswallowed(call)

    await _cancel_and_expect_end(asyncio.create_task(caller()), started)
    assert call.cancelled()


async def test_unswallowed_returns_the_result_when_not_cancelled() -> None:
    """Without a cancellation the guarded call's result is returned unchanged."""

    async def answer() -> int:
        return 42

    assert await unswallowed(answer()) == 42


async def test_resilient_raises_a_cancellation_its_step_swallowed() -> None:
    """A reader step that returns normally after losing a cancellation makes resilient()
    raise CancelledError, so the reading loop stops."""
    reader = _Reader()
    started = asyncio.Event()
    steps = 0

    async def step() -> None:
        nonlocal steps
        steps += 1
        started.set()
        if steps > 1:
            await asyncio.Event().wait()  # a later read: cancellable
        await _lose_a_cancellation()

    async def loop() -> None:
        reader.owner = asyncio.current_task()
        while True:
            await resilient(reader, step)  # type: ignore[arg-type]

    await _cancel_and_expect_end(asyncio.create_task(loop()), started)
    assert steps == 1, "the loop went on to another step"


async def test_keep_alive_ends_when_its_command_swallows_the_cancellation() -> None:
    """The keep-alive task stops when cancelled even if its XCLAIM lost the cancellation
    (the reader's close() waits for it)."""
    started = asyncio.Event()

    class Client:
        """A client whose pipelined XCLAIMs lose the first cancellation."""

        calls = 0

        def pipeline(self, transaction: bool = True) -> Client:
            return self

        def xclaim(self, *args: Any, **kwargs: Any) -> Client:
            return self

        async def execute(self, raise_on_error: bool = True) -> None:
            self.calls += 1
            started.set()
            if self.calls > 1:
                await asyncio.Event().wait()  # a later call: cancellable
            await _lose_a_cancellation()

    task = asyncio.create_task(keep_alive(_Reader(Client())))  # type: ignore[arg-type]
    await _cancel_and_expect_end(task, started)


# -- against the real Redis -----------------------------------------------------------------------

ClientFactory = Callable[[str], aioredis.Redis | None]

CLIENTS: dict[str, ClientFactory] = {
    "own client": lambda url: None,
    "passed client, redis-py default socket_timeout": lambda url: aioredis.Redis.from_url(url),
    "passed client, no socket_timeout": lambda url: aioredis.Redis.from_url(
        url, socket_timeout=None
    ),
}


async def _stop_right_after_a_message(
    backend: Any,
    start: Callable[[Any], Coroutine[Any, Any, None]],
    stop: Callable[[], Awaitable[None]],
) -> float:
    handled = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        handled.set()

    task = asyncio.create_task(start(handler))
    async with asyncio.timeout(5):
        await handled.wait()
    await asyncio.sleep(0)  # the consumer goes back to reading: cancel lands in the send
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        await stop()
    elapsed = loop.time() - started
    await asyncio.gather(task, return_exceptions=True)
    return elapsed


@pytest.mark.broker
@pytest.mark.parametrize("make_client", CLIENTS.values(), ids=CLIENTS.keys())
async def test_resilient_consumer_shutdown_does_not_wait_out_the_drain_timeout(
    make_backend: MakeBackend, redis_url: str, prefix: str, make_client: ClientFactory
) -> None:
    """ResilientConsumer.shutdown() with nothing in flight returns at once on RedisBackend,
    whether the backend made its client or was given one."""
    for n in range(3):
        client = make_client(redis_url)
        backend = make_backend(client=client)
        await backend.publish(f"{prefix}s", {"n": n})
        consumer = ResilientConsumer(backend, policy=Policy(), drain_timeout=30)
        elapsed = await _stop_right_after_a_message(backend, consumer.run, consumer.shutdown)
        await backend.aclose()
        if client is not None:
            await client.aclose()
        assert elapsed < 1.0, f"round {n}: shutdown took {elapsed:.3f}s"


@pytest.mark.broker
@pytest.mark.parametrize("make_client", CLIENTS.values(), ids=CLIENTS.keys())
async def test_async_loop_consumer_shutdown_returns_at_once(
    make_backend: MakeBackend, redis_url: str, prefix: str, make_client: ClientFactory
) -> None:
    """AsyncLoopConsumer.shutdown() on consume() returns at once, whether the backend made
    its client or was given one."""
    for n in range(3):
        client = make_client(redis_url)
        backend = make_backend(client=client)
        await backend.publish(f"{prefix}s", {"n": n})
        consumer = AsyncLoopConsumer(backend)
        elapsed = await _stop_right_after_a_message(backend, consumer.run, consumer.shutdown)
        await backend.aclose()
        if client is not None:
            await client.aclose()
        assert elapsed < 1.0, f"round {n}: shutdown took {elapsed:.3f}s"
