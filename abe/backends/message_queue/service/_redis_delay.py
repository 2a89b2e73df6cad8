"""Delayed redelivery on Redis: a sorted set per stream, scored by due time.

:meth:`RedisBackend.release_later <abe.backends.message_queue.service.redis.RedisBackend.
release_later>` moves an entry into the stream's delay set and acknowledges it in one Lua script
(:data:`HAND_OVER_LUA`): both happen or neither does. Every consumer runs a
:class:`DelayScheduler` that moves due entries back into their stream with another script
(:data:`MOVE_DUE_LUA`): the ZRANGEBYSCORE, the XADD and the ZREM of one entry happen in one
atomic step, so with any number of consumers each due entry is re-added exactly once. Due times
are the Redis server's clock (``TIME``), so consumers on hosts whose clocks differ agree. Re-adds
are paced by the stream's backlog (see :class:`DelayScheduler`), so that messages published
while a burst of retries comes due are not queued behind the whole burst.

The delay set is ordinary data: it survives a restart of a Redis that persists (append-only file
or snapshots) like the streams do. A member is the entry as JSON (``{"id", "f"}``: the original
entry id and its fields, the ``h:<name>`` header fields updated); the entry comes back with a new
id (so a new ``message_id`` and ``enqueued_at``) and the header :data:`DELIVERIES_HEADER`
carrying how many times it was delivered before, which the reader adds to its delivery count.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from ._redis_codec import DELIVERIES_HEADER
from ._redis_common import REFUSED_ERRORS, TRANSIENT_ERRORS

_CONNECTION_ERRORS = (*TRANSIENT_ERRORS, *REFUSED_ERRORS)

__all__ = [
    "DELAY_INDEX_KEY",
    "DELAY_KEY_PREFIX",
    "DELAY_SETS_LUA",
    "DUE_STREAMS_LUA",
    "STREAMS_PER_SCRIPT",
    "DELIVERIES_HEADER",
    "HAND_OVER_LUA",
    "MOVE_DUE_LUA",
    "DelayScheduler",
    "delay_key",
    "delay_ms",
    "member_of",
    "run_pipelined",
]

logger = logging.getLogger(__name__)

DELAY_INDEX_KEY = "abe:delay-index"
"""The delay index: a sorted set of the streams whose delay sets hold entries, each scored by
the earliest due time of its set (kept by the same scripts that change the sets), so a check
costs one command however many streams are served. Its name does not start with
:data:`DELAY_KEY_PREFIX`, so no pattern lookup of delay sets finds it."""

DELAY_KEY_PREFIX = "abe:delayed:"
"""The delay set of stream ``S`` is ``abe:delayed:S`` (a prefix no stream pattern of
``S``'s own name can match by accident)."""


HAND_OVER_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[3], first[2], KEYS[1])
return 1
"""
"""XACK entry ARGV[2] of stream KEYS[1] in group ARGV[1]; if it was pending, add member ARGV[4]
to the delay set KEYS[2], due ARGV[3] ms from the server's now, and score the stream in the
delay index KEYS[3] by the earliest due time of its delay set. Returns 1, or 0 when the entry
was not pending (settled already: nothing is added)."""

MOVE_DUE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local backlog = tonumber(ARGV[2])
local paced = 0
if backlog > 0 and #redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1) > 0
    and redis.call('TYPE', KEYS[2]).ok == 'stream' then
  local unread = nil
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    local last = '0-0'
    for i = 1, #group, 2 do
      if group[i] == 'last-delivered-id' then last = group[i + 1] end
    end
    local n = #redis.call('XRANGE', KEYS[2], '(' .. last, '+', 'COUNT', backlog)
    if unread == nil or n < unread then unread = n end
  end
  if unread ~= nil then
    local room = backlog - unread
    paced = 1
    if room <= 0 then
      room = tonumber(ARGV[3])
      paced = 2
    end
    if room < limit then limit = room else paced = 0 end
  end
end
local due = {}
if limit > 0 then
  due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
end
for _, member in ipairs(due) do
  local ok, entry = pcall(cjson.decode, member)
  if ok and type(entry) == 'table' and type(entry.f) == 'table' and #entry.f >= 2 then
    redis.call('XADD', KEYS[2], '*', unpack(entry.f))
  else
    redis.call('HSET', KEYS[1] .. ':unreadable', member, now)
  end
  redis.call('ZREM', KEYS[1], member)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if first[2] then
  wait = math.max(0, tonumber(first[2]) - now)
  redis.call('ZADD', KEYS[3], first[2], KEYS[2])
else
  redis.call('ZREM', KEYS[3], KEYS[2])
end
if wait ~= 0 then paced = 0 end
return {#due, wait, paced}
"""
"""Move up to ARGV[1] due members of delay set KEYS[1] back into stream KEYS[2], atomically,
paced by the stream's backlog: when ARGV[2] > 0 and the stream's consumer groups have unread
entries (the group with the fewest counts), at most ``ARGV[2] - unread`` are moved, and when
there is no room at all, ARGV[3] (0 or 1). Returns ``{moved, ms until the next is due or -1,
paced}`` where ``paced`` is 1 when due entries were held back for lack of room, 2 when there
was no room at all, else 0. A member that is not a readable entry is kept in the hash
``KEYS[1]:unreadable`` instead of being lost or retried forever. The stream's score in the
delay index KEYS[3] becomes the earliest due time left in its delay set (or the stream leaves
the index when the set is empty)."""

DUE_STREAMS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = {}
for _, stream in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  if redis.call('EXISTS', ARGV[1] .. stream) == 1 then
    due[#due + 1] = stream
  else
    redis.call('ZREM', KEYS[1], stream)
  end
end
local nxt = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local wait = -1
if nxt[2] then wait = tonumber(nxt[2]) - now end
return {due, wait}
"""
"""The streams of the delay index KEYS[1] with entries due by the server's now, and the ms
until the next stream's earliest entry is due (-1: none waits): one command per check, however
many streams there are. A due stream whose delay set (ARGV[1] followed by the stream's name) no
longer exists (deleted with its stream) leaves the index."""


DELAY_SETS_LUA = """
local found = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    found[#found + 1] = i - 1
  else
    redis.call('ZREM', KEYS[1], ARGV[i - 1])
  end
end
return found
"""
"""Of the delay sets KEYS[2..n] (of streams ARGV[1..n-1]), the positions (1-based, in ARGV)
of those that exist; a stream whose delay set does not exist leaves the delay index KEYS[1]
(what :data:`MOVE_DUE_LUA` would do for it). One command checks a whole chunk of streams."""

STREAMS_PER_SCRIPT = 1000
"""Streams one selecting script looks at (:func:`select_streams`; the calls for more streams go
in one pipelined round trip): bounds the time one script holds the server."""


def delay_key(stream: str) -> str:
    """The delay set of ``stream``."""
    return DELAY_KEY_PREFIX + stream


def delay_ms(delay: float | timedelta) -> int:
    """``delay`` in whole milliseconds, rounded up (never sooner than asked).

    Raises:
        ValueError: ``delay`` is negative or not finite.
    """
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
    return math.ceil(seconds * 1000)


def member_of(entry_id: str, fields: Mapping[str | bytes, str | bytes]) -> str:
    """The delay-set member for an entry with ``fields`` (unique per stream by ``entry_id``)."""
    flat: list[str] = []
    for name, value in fields.items():
        flat.append(name.decode() if isinstance(name, bytes) else name)
        flat.append(value.decode() if isinstance(value, bytes) else value)
    return json.dumps({"id": entry_id, "f": flat}, separators=(",", ":"), ensure_ascii=False)


async def run_pipelined(
    client: aioredis.Redis, script: Any, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
) -> list[Any]:
    """Run ``script`` (a registered ``AsyncScript``) once per ``(keys, args)`` of ``calls``, all
    in one pipelined round trip of EVALSHA. Calls the server did not know the script for
    (NOSCRIPT: a restarted or flushed Redis) are sent again once it is loaded; no call runs
    twice. (A pipeline given the script object itself asks ``SCRIPT EXISTS`` first, a round trip
    of its own every time.)

    Returns:
        One reply per call, in order; a call that failed has its exception instead.

    Raises:
        redis.exceptions.RedisError: the round trip itself failed (nothing is known to have
            run).
    """
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for i in todo:
            keys, args = calls[i]
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        missing = []
        for i, result in zip(todo, results, strict=True):
            replies[i] = result
            if isinstance(result, NoScriptError):
                missing.append(i)
        if not missing or attempt:
            break
        script.sha = await client.script_load(script.script)
        todo = missing
    return replies


async def select_streams(
    client: aioredis.Redis,
    script: Any,
    streams: Sequence[str],
    call: Callable[[Sequence[str]], tuple[Sequence[Any], Sequence[Any]]],
) -> list[str]:
    """Those of ``streams`` a selecting script names, in order: ``script`` runs once per
    :data:`STREAMS_PER_SCRIPT` streams with the ``(keys, args)`` that ``call`` makes of them (all
    calls in one round trip, :func:`run_pipelined`) and returns the 1-based positions, in that
    chunk, of the streams it selects.

    Raises:
        redis.exceptions.RedisError: the round trip failed, or Redis refused a call.
    """
    chunks = [
        streams[start : start + STREAMS_PER_SCRIPT]
        for start in range(0, len(streams), STREAMS_PER_SCRIPT)
    ]
    replies = await run_pipelined(client, script, [call(chunk) for chunk in chunks])
    selected: list[str] = []
    for chunk, reply in zip(chunks, replies, strict=True):
        if isinstance(reply, BaseException):
            raise reply
        selected.extend(chunk[int(position) - 1] for position in reply)
    return selected


class DelayScheduler:
    """Moves due entries of the delay sets of ``streams`` back into their streams.

    One runs in every consumer; the scripts make that safe. It sleeps until the next entry is due
    (as Redis reports it), at most ``poll`` seconds, and sooner when :meth:`wake` is called
    (after this process delayed an entry).

    Due entries come back paced by the stream's backlog, so that messages published meanwhile
    never queue behind a burst of returning retries: an entry is re-added only while the
    stream's consumer group has fewer than ``backlog`` entries not read yet (with several
    groups, the one with the fewest counts), at most as many as there is room for. Streams
    whose due entries were held back are checked again every ``pace`` seconds (only they), so
    retries flow at the rate the consumers read. When the group stays ``backlog`` or more
    entries behind, one due entry per stream still comes back every ``poll`` seconds: retries
    are never starved.

    A check costs one command however many streams are served: the delay index
    (:data:`DELAY_INDEX_KEY`, kept in Redis by the scripts that change the delay sets) says
    which streams have entries due, and only those are visited. Each served stream's delay set
    is looked at once when first served, so sets written before the index existed are found
    too: one command per :data:`STREAMS_PER_SCRIPT` streams says which sets exist, and only those
    are visited.

    Args:
        client: The backend's Redis client.
        streams: The stream keys whose delay sets to serve.
        poll: Longest sleep between two checks, for entries other consumers delay.
        batch: Most entries moved per script run.
        patterns: Stream patterns (``tenant:*``) whose streams' delay sets to serve too.
        discover_interval: Seconds between look-ups of the delay sets of the patterns.
        backlog: Unread entries a stream may have for due entries to be re-added (0: re-add
            every due entry at once, unpaced).
        pace: Seconds between checks of a stream whose due entries were held back, and the
            shortest sleep between two checks (entries due within it are moved together).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        streams: Iterable[str],
        *,
        poll: float = 0.25,
        batch: int = 100,
        patterns: Iterable[str] = (),
        discover_interval: float = 10.0,
        backlog: int = 4,
        pace: float = 0.005,
    ) -> None:
        self._client = client
        self._script = client.register_script(MOVE_DUE_LUA)
        self._due_script = client.register_script(DUE_STREAMS_LUA)
        self._sets_script = client.register_script(DELAY_SETS_LUA)
        self.streams: list[str] = list(dict.fromkeys(streams))
        """Streams whose delay sets are served (those of :meth:`add` and of the patterns too)."""
        self.patterns = tuple(patterns)
        """Stream patterns (``tenant:*``): their streams' delay sets are looked up with SCAN."""
        self.discover_interval = discover_interval
        self._next_discovery = 0.0
        self.poll = poll
        self.batch = batch
        self.backlog = backlog
        self.pace = pace
        self.moved = 0
        """Entries this scheduler re-added to their streams."""
        self.held: set[str] = set()
        """Streams whose due entries the last check held back (their backlog was full)."""
        self._starved_until: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._next_check = math.inf
        """Loop time of the next check the task has planned (``inf`` while it checks or before
        it runs: any :meth:`wake` then asks for another check)."""
        self._task: asyncio.Task[None] | None = None
        self._served = set(self.streams)
        self._unchecked: dict[str, None] = dict.fromkeys(self.streams)
        """Streams not checked one by one yet: their delay sets may predate the delay index
        (written by an older version), so each is checked once; after that the index says
        which streams have entries due."""

    def start(self) -> None:
        """Run in a task of the running loop (once; later calls do nothing)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self, due_in: float = 0.0) -> None:
        """Check again now: an entry was just delayed, due in ``due_in`` seconds (nothing to do
        when the next check comes sooner than that anyway)."""
        if asyncio.get_running_loop().time() + due_in < self._next_check:
            self._wake.set()

    def add(self, stream: str) -> None:
        """Serve the delay set of ``stream`` too (a stream found through a pattern)."""
        if stream not in self._served:
            self._served.add(stream)
            self.streams.append(stream)
            self._unchecked[stream] = None
            self._next_check = math.inf  # the next wake() checks: this set's entries are new

    async def _discover(self) -> None:
        """Find the delay sets of streams matching the patterns (after a restart, say)."""
        loop = asyncio.get_running_loop()
        if not self.patterns or loop.time() < self._next_discovery:
            return
        self._next_discovery = loop.time() + self.discover_interval
        for pattern in self.patterns:
            async for key in self._client.scan_iter(
                match=DELAY_KEY_PREFIX + pattern, count=1000, _type="zset"
            ):
                name = key.decode() if isinstance(key, bytes) else str(key)
                self.add(name[len(DELAY_KEY_PREFIX) :])

    async def move_due(self, only: Iterable[str] | None = None) -> float:
        """Move the due entries the backlogs have room for now (of ``only`` these streams, or
        of the served streams the delay index has entries due for, plus, once, every served
        stream not checked yet whose delay set exists); updates :attr:`held`.

        Returns:
            Seconds until the next entry is due (``inf`` when none waits), not counting the
            entries held back (:attr:`held`).
        """
        wait = math.inf
        if only is None:
            await self._discover()
            due, wait = await self._due_streams()
            unchecked = list(self._unchecked)
            existing = await self._existing_sets(unchecked) if unchecked else []
            streams = list(dict.fromkeys([*existing, *due]))
            self.held.clear()
        else:
            unchecked = []
            streams = list(only)
            self.held.difference_update(streams)
        now = asyncio.get_running_loop().time()
        starved = self._starved_until
        while streams:
            # One round trip for every stream (the scripts are atomic one by one), then again
            # only for the streams that had a full batch due.
            calls = [
                (
                    (delay_key(stream), stream, DELAY_INDEX_KEY),
                    (self.batch, self.backlog, 1 if now >= starved.get(stream, 0.0) else 0),
                )
                for stream in streams
            ]
            replies = await run_pipelined(self._client, self._script, calls)
            full = []
            error: BaseException | None = None
            for stream, reply in zip(streams, replies, strict=True):
                if isinstance(reply, BaseException):
                    error = error or reply
                    continue
                moved, next_ms, paced = int(reply[0]), int(reply[1]), int(reply[2])
                self.moved += moved
                if paced:
                    self.held.add(stream)
                    if paced == 2 and moved:  # the one entry a full backlog lets through
                        starved[stream] = now + self.poll
                elif moved >= self.batch:
                    full.append(stream)
                elif next_ms >= 0:
                    wait = min(wait, next_ms / 1000)
            if error is not None:
                raise error
            streams = full
        for stream in unchecked:
            self._unchecked.pop(stream, None)
        return wait

    async def _existing_sets(self, streams: list[str]) -> list[str]:
        """Those of ``streams`` whose delay sets exist (one command per
        :data:`STREAMS_PER_SCRIPT` streams, all in one round trip); the others leave the index.

        Raises:
            redis.exceptions.RedisError: Redis did not answer, or refused a check.
        """

        def call(chunk: Sequence[str]) -> tuple[Sequence[Any], Sequence[Any]]:
            return (DELAY_INDEX_KEY, *map(delay_key, chunk)), chunk

        return await select_streams(self._client, self._sets_script, streams, call)

    async def _due_streams(self) -> tuple[list[str], float]:
        """The served streams the delay index has entries due for (one command), and seconds
        until the next stream's earliest entry is due (``inf``: none waits)."""
        (reply,) = await run_pipelined(
            self._client, self._due_script, [((DELAY_INDEX_KEY,), (DELAY_KEY_PREFIX,))]
        )
        if isinstance(reply, BaseException):
            raise reply
        names, next_ms = reply[0], int(reply[1])
        due = []
        for raw in names:
            stream = raw.decode() if isinstance(raw, bytes) else str(raw)
            if stream not in self._served and any(
                fnmatch.fnmatchcase(stream, pattern) for pattern in self.patterns
            ):
                self.add(stream)  # a new stream of a pattern, before the next SCAN finds it
                self._unchecked.pop(stream, None)
            if stream in self._served:
                due.append(stream)
        return due, next_ms / 1000 if next_ms >= 0 else math.inf

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        next_full = 0.0  # when every stream is checked again (the held ones more often)
        while True:
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                if woken or not self.held or loop.time() >= next_full:
                    wait = await self.move_due()
                    next_full = loop.time() + min(wait, self.poll)
                else:
                    await self.move_due(self.held)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RedisError, connection loss: never end the task
                failures += 1
                # An outage or a refused login is the reader's to report (once, and loudly):
                # the scheduler only retries. Anything else is worth a warning of its own.
                level = logging.DEBUG if isinstance(exc, _CONNECTION_ERRORS) else logging.WARNING
                if failures == 1:
                    logger.log(level, "Moving due delayed entries failed; retrying: %s", exc)
                next_full = 0.0
                sleep = min(self.poll * 2**failures, 5.0)
            else:
                # Entries due within ``pace`` of each other are moved in one check.
                sleep = max(next_full - loop.time(), self.pace)
                if self.held:
                    sleep = self.pace
            self._next_check = loop.time() + sleep
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._wake.wait()
            self._next_check = math.inf

    async def stop(self) -> None:
        """Stop the task (entries stay in the delay sets for the next consumer)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
