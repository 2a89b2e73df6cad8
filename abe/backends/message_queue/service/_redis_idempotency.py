"""Idempotency completion records written with the acknowledgement of their stream entries.

One Lua script serves both the backend's batched
:meth:`~abe.backends.message_queue.service.redis.RedisBackend.complete_idempotent_nowait`
(records, the handlers' Redis effects and the XACKs of a whole batch in one round trip) and
idempotency stores completing a message from any other source (record and effects only).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "COMPLETE_LUA",
    "COMPLETE_SHA",
    "DONE",
    "Command",
    "CompletionBuffer",
    "completion_args",
]

logger = logging.getLogger(__name__)

DONE = "done"
"""The value of a completion record (claims hold their owner's token, never this)."""

COMPLETE_LUA = """
local done = 0
local a = 1
for k = 1, #KEYS, 2 do
  local owner, ttl, group, entry = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local count = tonumber(ARGV[a + 4])
  a = a + 5
  local current = redis.call('GET', KEYS[k])
  local mine = (not current) or current == owner
  for _ = 1, count do
    local argc = tonumber(ARGV[a])
    if mine then
      redis.call(unpack(ARGV, a + 1, a + argc))
    end
    a = a + 1 + argc
  end
  if mine then
    redis.call('SET', KEYS[k], 'done', 'PX', ttl)
    if KEYS[k + 1] ~= '' then
      redis.call('XACK', KEYS[k + 1], group, entry)
    end
    done = done + 1
  end
end
return done
"""
"""Completes every item: KEYS holds pairs (claim key, stream to acknowledge in or '');
ARGV holds per item: owner, TTL in ms, group, entry id, the effects' count, then for each
effect its argument count followed by the command and its arguments.

An item whose claim belongs to someone else (taken over, or completed by another consumer) is
skipped whole: no effect, no record, no XACK. A lapsed claim nobody took over still counts as
the caller's. Returns how many items were completed."""

COMPLETE_SHA = hashlib.sha1(COMPLETE_LUA.encode()).hexdigest()
"""The script's SHA1, for an EVALSHA sent in a pipeline with other commands."""

Command = Sequence[str | bytes | int | float]
"""One Redis command with its arguments, e.g. ``("HINCRBY", "totals", "eu", 5)``."""

Arg = str | bytes | int | float


def completion_args(
    owner: str, ttl: float, group: str, entry_id: str, effects: Iterable[Command]
) -> list[Arg]:
    """The ARGV part of one item of :data:`COMPLETE_LUA`.

    Args:
        owner: The claim's owner token.
        ttl: Seconds the completion record is kept.
        group: The consumer group (ignored without a stream).
        entry_id: The stream entry to acknowledge (ignored without a stream).
        effects: Commands to run before the record is written.

    Returns:
        The arguments.
    """
    args: list[Arg] = [owner, max(1, int(ttl * 1000)), group, entry_id]
    commands = list(effects)
    args.append(len(commands))
    for command in commands:
        args.append(len(command))
        args.extend(command)
    return args


class CompletionBuffer:
    """Completions waiting to be sent in one script call (like the readers' buffered acks).

    Args:
        script: The registered :data:`COMPLETE_LUA` (a redis-py ``AsyncScript``).
        limit: Completions that trigger a flush at once.
        delay: Seconds the first buffered completion may wait before a flush.
    """

    def __init__(self, script: Any, limit: int, delay: float) -> None:
        self._script = script
        self._limit = limit
        self._delay = delay
        self._keys: list[str] = []
        self._args: list[Arg] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._keys) // 2

    def add(self, record_key: str, stream: str, args: list[Arg]) -> None:
        """Buffer one completion; flushes in the background when the buffer is full or after
        ``delay``."""
        self._keys += (record_key, stream)
        self._args += args
        if len(self) >= self._limit:
            self._in_background()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._in_background)

    def _in_background(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._keys:
            return
        task = asyncio.get_running_loop().create_task(self._flush_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_quietly(self) -> None:
        try:
            await self._send()
        except Exception as exc:
            logger.warning(
                "Writing idempotency completions failed; their entries stay pending and are "
                "delivered again after claim_idle: %s",
                exc,
            )

    def take(self) -> tuple[list[str], list[Arg]] | None:
        """Take every buffered completion (KEYS and ARGV of :data:`COMPLETE_LUA`), for a caller
        that sends them in a pipeline with its own command; ``None`` when there are none."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._keys:
            return None
        keys, args = self._keys, self._args
        self._keys, self._args = [], []
        return keys, args

    async def send(self, keys: list[str], args: list[Arg]) -> None:
        """Run :data:`COMPLETE_LUA` on taken completions (loading the script if needed).

        Raises:
            redis.exceptions.RedisError: Redis did not take them.
        """
        await self._script(keys=keys, args=args)

    async def flush(self) -> None:
        """Send every buffered completion now (and wait for background flushes).

        Raises:
            redis.exceptions.RedisError: Redis did not take them; they are dropped from the
                buffer, and their entries, still pending, are delivered again.
        """
        await self._send()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keys, args = self._keys, self._args
        self._keys, self._args = [], []
        if keys:
            await self._script(keys=keys, args=args)
