"""A virtual-time asyncio event loop: simulated hours pass in milliseconds.

The loop's clock (``loop.time()``) only moves when every task is waiting: instead of blocking in
the OS selector until the next timer is due, the loop jumps straight to it. Everything that reads
time through the loop (``asyncio.sleep``, ``call_later``, :class:`~resilience.clock.LoopClock`,
so every timer of the package) runs on simulated time, and a run is deterministic: no real time
and no I/O polling ever enter the schedule.

Why not ``looptime``: it polls the real selector on every turn and spends dozens of no-op turns
before each jump (a safeguard for ``asyncio.timeout`` races this package never has); a dedicated
loop is several times faster and fails loudly on a deadlock instead of waiting in real time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

__all__ = ["SimulationStalled", "VirtualTimeLoop", "run_virtual"]

T = TypeVar("T")


class SimulationStalled(RuntimeError):
    """Every task waits and no timer is scheduled: the simulation can never progress."""


class _VirtualSelector(selectors.BaseSelector):
    """Registers file objects without polling them; ``select`` advances virtual time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationStalled(
                "every task is waiting and no timer is scheduled: the simulation cannot progress"
            )
        if timeout > 0:
            self.now += timeout
        return []

    def close(self) -> None:
        self._keys.clear()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return dict(self._keys)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is simulated and jumps to the next due timer.

    Use it for simulations only: it never waits for I/O (sockets, subprocesses and threads
    completing would never wake it up).
    """

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        """Simulated seconds since the loop was created."""
        return self._virtual.now


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh :class:`VirtualTimeLoop` and close it.

    Raises:
        SimulationStalled: the simulation deadlocked.
        RuntimeError: called from a thread that already runs an event loop.
    """
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)
