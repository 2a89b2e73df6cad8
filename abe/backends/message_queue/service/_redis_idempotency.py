"""The Lua script that writes an idempotency completion record and acknowledges the entry.

Kept apart from the backend so that the one script serves both the backend's
:meth:`~abe.backends.message_queue.service.redis.RedisBackend.complete_idempotent` (record,
effects and XACK in one step) and idempotency stores completing a message from any other source
(record and effects only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["COMPLETE_LUA", "DONE", "complete_args"]

DONE = "done"
"""The value of a completion record (claims hold their owner's token, never this)."""

COMPLETE_LUA = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return 0
end
local i = 6
local count = tonumber(ARGV[i])
i = i + 1
for _ = 1, count do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + 1 + argc
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if KEYS[2] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[4], ARGV[5])
end
return 1
"""
"""KEYS[1]: the claim key; KEYS[2]: the stream to acknowledge in ('' for none).
ARGV: owner, completion value, TTL in ms, group, entry id, then the effects: their count, and
for each its argument count followed by the command and its arguments.

Returns 1 after running the effects, writing the record and acknowledging; 0 without doing
anything when the claim belongs to someone else (taken over, or completed by another consumer).
A lapsed claim nobody took over still counts as the caller's."""

Command = Sequence[str | bytes | int | float]
"""One Redis command with its arguments, e.g. ``("HINCRBY", "totals", "eu", 5)``."""


def complete_args(
    owner: str,
    ttl_ms: int,
    group: str,
    entry_id: str,
    effects: Iterable[Command],
) -> list[str | bytes | int | float]:
    """The ARGV of :data:`COMPLETE_LUA`.

    Args:
        owner: The claim's owner token.
        ttl_ms: How long the completion record is kept, in milliseconds (>= 1).
        group: The consumer group (ignored without a stream).
        entry_id: The stream entry to acknowledge (ignored without a stream).
        effects: Commands to run before the record is written.

    Returns:
        The argument list.
    """
    args: list[str | bytes | int | float] = [owner, DONE, max(1, ttl_ms), group, entry_id]
    commands = list(effects)
    args.append(len(commands))
    for command in commands:
        args.append(len(command))
        args.extend(command)
    return args
