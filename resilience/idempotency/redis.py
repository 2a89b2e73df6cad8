"""Claims and completion records in Redis.

A claim is ``SET key owner NX PX lease GET``: one round trip that claims a free key or says who
holds it. The completion record replaces the claim (``SET key done PX ttl``) in a Lua script
that first checks the claim is still the caller's and runs the handler's own Redis commands
(:class:`RedisEffects`). When the messages come from a
:class:`~abe.backends.message_queue.service.redis.RedisBackend`, completions are buffered like
acknowledgements and one script call per batch writes them and acknowledges their entries, so
the success path costs one round trip more than without the layer: the claim.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from abe.backends.message_queue.service._redis_idempotency import (
    COMPLETE_LUA,
    COMPLETE_SHA,
    DONE,
    Command,
    completion_args,
)

from ._store import ClaimLost, ClaimState

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from abe.backends.message_queue.service.redis import RedisBackend

    from ..delivery import Delivery

__all__ = ["RedisEffects", "RedisStore"]

logger = logging.getLogger(__name__)

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisEffects:
    """The handler's Redis writes, run in the same Lua script as the completion record.

    Returned by :func:`~resilience.idempotency.current_transaction` under a
    :class:`RedisStore`. Commands are queued, not sent: they run after the handler returns,
    atomically with the completion record (and the acknowledgement), or not at all when the
    handler fails or the claim was lost. Do not read back what you queue.

    Attributes:
        commands: The queued commands, in order.
    """

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def call(self, *command: str | bytes | int | float) -> None:
        """Queue one command, e.g. ``effects.call("HINCRBY", "totals", "eu", 5)``.

        Raises:
            ValueError: no command was given.
        """
        if not command:
            raise ValueError("a Redis command needs at least its name")
        self.commands.append(command)


class RedisStore:
    """Idempotency records in Redis (server-side expiry, shared by every consumer process).

    Args:
        client: A ``redis.asyncio.Redis`` client; ``None`` uses the backend's.
        backend: The consumer's Redis backend: completion records are then written in the same
            script as the acknowledgement of the entry.
        prefix: Prepended to every key.

    Raises:
        ValueError: neither ``client`` nor ``backend`` was given.
    """

    def __init__(
        self,
        client: aioredis.Redis | None = None,
        *,
        backend: RedisBackend | None = None,
        prefix: str = "idempotency:",
    ) -> None:
        if client is None:
            if backend is None:
                raise ValueError("RedisStore needs a client or a RedisBackend")
            client = backend.client
        self.client = client
        self.backend = backend
        self.prefix = prefix
        self._complete = client.register_script(COMPLETE_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r}, acks={self.backend is not None})"

    async def claim(self, key: str, owner: str, lease: float) -> ClaimState:
        """Claim ``key`` in one ``SET NX PX GET``, sent in one pipeline with the completions
        the backend has buffered meanwhile (so they cost no round trip of their own)."""
        px = max(1, int(lease * 1000))
        taken = self.backend.take_idempotent_completions() if self.backend is not None else None
        held: Any
        if taken is None:
            held = await self.client.set(self.prefix + key, owner, nx=True, px=px, get=True)
        else:
            held = await self._claim_with(taken, key, owner, px)
        if held is None:
            return ClaimState.CLAIMED
        value = held.decode() if isinstance(held, bytes) else str(held)
        return ClaimState.COMPLETED if value == DONE else ClaimState.BUSY

    async def _claim_with(
        self, taken: tuple[list[str], list[Any]], key: str, owner: str, px: int
    ) -> Any:
        keys, args = taken
        pipe = self.client.pipeline(transaction=False)
        pipe.evalsha(COMPLETE_SHA, len(keys), *keys, *args)
        pipe.set(self.prefix + key, owner, nx=True, px=px, get=True)
        # If the pipeline fails, nothing is known to be written: the completed entries stay
        # pending and are delivered again (and run again: their effects were not applied).
        done, held = await pipe.execute(raise_on_error=False)
        if isinstance(done, Exception):
            assert self.backend is not None
            if isinstance(done, NoScriptError):  # a fresh server: the call loads the script
                await self.backend.send_idempotent_completions(keys, args)  # loads it
            else:
                logger.warning(
                    "Writing idempotency completions failed; their entries stay pending and "
                    "are delivered again: %s",
                    done,
                )
        if isinstance(held, Exception):
            raise held
        return held

    @contextlib.asynccontextmanager
    async def complete(
        self, key: str, owner: str, ttl: float, delivery: Delivery
    ) -> AsyncIterator[RedisEffects]:
        """Yield a :class:`RedisEffects`; after the handler, run them and write the completion
        record in one script (with a backend: buffered with the entry's acknowledgement).

        Raises:
            ClaimLost: someone else holds the claim; nothing was run or written.
        """
        effects = RedisEffects()
        yield effects
        record_key = self.prefix + key
        message = delivery.message
        if self.backend is not None and message is not None and message.message_id:
            # Buffered with the acknowledgement: no round trip of its own. A claim lost by
            # then leaves the entry pending; its redelivery finds the other owner's record.
            self.backend.complete_idempotent_nowait(
                message, record_key, owner, ttl, effects.commands
            )
            return
        args = completion_args(owner, ttl, "", "", effects.commands)
        if not await self._complete(keys=[record_key, ""], args=args):
            raise ClaimLost(f"the claim on {key!r} was taken over while the handler ran")

    async def release(self, key: str, owner: str) -> None:
        """Drop ``owner``'s claim on ``key`` (a check-and-delete script)."""
        await self._release(keys=[self.prefix + key], args=[owner])
