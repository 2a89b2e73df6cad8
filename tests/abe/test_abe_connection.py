"""ConnectionStatus: reachability records and when an outage is worth a warning."""

from __future__ import annotations

import itertools

from abe.backends.message_queue.base.connection import ConnectionStatus


class Ticks:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_warnings_come_at_growing_intervals_and_at_most_once_a_minute() -> None:
    """Failures warn on each attempt early in an outage, then ever more rarely, capped at 60 s."""
    clock = Ticks()
    status = ConnectionStatus(clock)
    warned_at: list[float] = []
    for _ in range(2000):  # one attempt every 5 s for about 2.8 hours
        if status.failed(ConnectionError("refused")):
            warned_at.append(clock.now - 100.0)
        clock.now += 5.0
    assert warned_at[:3] == [0.0, 5.0, 10.0]
    gaps = [b - a for a, b in itertools.pairwise(warned_at)]
    assert gaps == sorted(gaps)
    assert max(gaps) == 60.0
    assert gaps.count(60.0) > 100
    assert status.attempts == 2000
    assert status.connected is False
    assert status.last_error == "ConnectionError: refused"


def test_success_ends_the_outage_and_the_next_one_warns_at_once() -> None:
    """After a success the status is connected; the next failure starts a new, warned outage."""
    clock = Ticks()
    status = ConnectionStatus(clock)
    initially = status.connected  # a local, so the check does not narrow status.connected
    assert initially is None
    status.failed(OSError("down"))
    clock.now += 3.0
    assert status.down_for == 3.0
    status.succeeded()
    assert (status.connected, status.attempts, status.down_for) == (True, 0, 0.0)
    clock.now += 0.1
    assert status.failed(OSError("down again")) is True
    assert status.outages == 2


def test_warnings_can_be_held_back() -> None:
    """With warn off, failures are recorded but never ask for a warning."""
    status = ConnectionStatus(Ticks())
    status.warn = False
    assert status.failed(OSError("down")) is False
    assert status.attempts == 1
