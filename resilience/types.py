"""The types every part of the package shares: handlers, middleware, gates, policy sections.

A leaf module: it imports nothing of :mod:`resilience` at run time, so every layer, the
pipeline, the consumer and the policy can depend on it without depending on each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from abe.backends.message_queue.base import MessageQueueBackend

    from ._config import Reader
    from .classify import Classifier
    from .clock import Clock
    from .delivery import Delivery
    from .events import EventBus

__all__ = [
    "GATES_EXTRA",
    "BuildContext",
    "CallNext",
    "Flow",
    "Gate",
    "Handler",
    "Middleware",
    "PolicySection",
]

GATES_EXTRA = "resilience.breaker.gates"
"""Key in :attr:`Delivery.extras <resilience.delivery.Delivery.extras>` of the list of pausing
gates (circuit breakers) that held the delivery or saw it fail. The dead-letter router reads it
to hold, rather than dead-letter, a message that ran out of attempts or time while such a
breaker is forced open, and to warn when a message runs out of attempts before the breaker
opened."""

Handler = Callable[[dict[str, Any]], Awaitable[None]]
"""The user's handler: ``async def handler(payload: dict) -> None``."""

CallNext = Callable[["Delivery"], Awaitable[None]]
"""The rest of the pipeline, as seen from one middleware."""


class Middleware(Protocol):
    """``async def __call__(self, delivery, call_next) -> None``.

    Optionally a middleware also offers ``link(call_next) -> CallNext``, returning the callable
    the pipeline uses in its place (for example ``functools.partial(self._run, call_next)``),
    which saves a keyword-argument call per message. A middleware may also offer the success-path
    hooks of :class:`resilience.hooks.Hooks`, which the pipeline then runs in one frame with
    its neighbours' hooks.
    """

    def __call__(self, delivery: Delivery, call_next: CallNext) -> Awaitable[None]:
        """Process ``delivery``, calling ``call_next(delivery)`` as often as it decides."""
        ...


class Flow:
    """A gate's answer to "certainly not paused?" in one attribute.

    The consumer asks its gates before every message whether to stop pulling. A gate that
    offers a ``flow`` attribute (a :class:`Flow` it keeps up to date) is asked
    :attr:`Gate.paused` only while :attr:`steady` is false; a gate without one is asked every
    time.

    Args:
        steady: ``True`` when the gate is certainly not paused.
    """

    __slots__ = ("steady",)

    def __init__(self, steady: bool = True) -> None:
        self.steady = steady

    def __repr__(self) -> str:
        return f"Flow(steady={self.steady})"


@runtime_checkable
class Gate(Protocol):
    """A middleware that can pause message flow: the pausing circuit breaker.

    The consumer stops pulling messages while a gate in its pipeline is :attr:`paused`; the
    dead-letter router asks a gate a failed message went through whether it :meth:`holds` it
    (rather than dead-lettering it). A gate may offer a :class:`Flow` as its ``flow``
    attribute, so that the consumer reads one attribute per message instead of calling
    :attr:`paused` while the gate is certainly open. A gate lists itself in
    :attr:`Delivery.extras <resilience.delivery.Delivery.extras>` under
    :data:`~resilience.breaker.GATES_EXTRA` when it holds or fails a delivery.
    """

    @property
    def name(self) -> str:
        """The gate's name, for logs."""
        ...

    @property
    def paused(self) -> bool:
        """Whether the consumer should stop pulling now."""
        ...

    async def wait_resumed(self) -> None:
        """Return once pulling (and calling) may go on."""
        ...

    def holds(self, delivery: Delivery) -> bool:
        """Whether ``delivery``, which failed through this gate, must be held rather than
        dead-lettered."""
        ...


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a policy section may need to build its middleware."""

    clock: Clock
    classifier: Classifier
    backend: MessageQueueBackend | None = None
    group: str | None = None
    handler: Handler | None = None
    events: EventBus | None = None
    """The consumer's event bus, for sections that subscribe to or emit events."""


class PolicySection(Protocol):
    """A policy section provided by another module (``policy_section`` in that module)."""

    name: str
    order: int

    def parse(self, reader: Reader) -> Any:
        """Validate the section (call ``reader.finish()``) and return its frozen config."""
        ...

    def to_dict(self, config: Any) -> dict[str, Any]:
        """The section as plain data (the inverse of :meth:`parse`)."""
        ...

    def middleware(self, config: Any, context: BuildContext) -> Middleware | None:
        """The middleware for ``config`` (``None`` when it contributes none)."""
        ...
