"""RetryBudget: the sliding window of first attempts and retries, against a plain model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.budget import RetryBudget
from resilience.clock import FakeClock


class _Model:
    """The budget's rule written plainly: every event keeps its bucket (whole seconds since the
    first reading, the window being 10 one-second buckets), and the window holds the events of
    the current bucket and the 9 before it."""

    def __init__(self, ratio: float, min_per_second: float) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.start: float | None = None
        self.deposits: list[int] = []
        self.withdrawals: list[int] = []

    def _bucket(self, now: float) -> int:
        if self.start is None:
            self.start = now
        return int((now - self.start) // 1.0)

    def _allowed_and_spent(self, now: float) -> tuple[float, int, int]:
        current = self._bucket(now)
        deposits = sum(1 for b in self.deposits if b > current - 10)
        spent = sum(1 for b in self.withdrawals if b > current - 10)
        return self.ratio * deposits + self.min_per_second * 10, spent, current

    def deposit(self, now: float) -> None:
        self.deposits.append(self._bucket(now))

    def try_spend(self, now: float) -> bool:
        allowed, spent, current = self._allowed_and_spent(now)
        if spent + 1 > allowed:
            return False
        self.withdrawals.append(current)
        return True

    def available(self, now: float) -> float:
        allowed, spent, _ = self._allowed_and_spent(now)
        return max(0.0, allowed - spent)


_STEPS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=60).map(lambda quarters: quarters / 4),
        st.sampled_from(["deposit", "deposit_reading", "try_spend", "available"]),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(steps=_STEPS, ratio=st.sampled_from([0.0, 0.5, 1.0]), floor=st.sampled_from([0.0, 0.3]))
def test_the_budget_follows_the_sliding_window_model(
    steps: list[tuple[float, str]], ratio: float, floor: float
) -> None:
    """Deposits (reading the clock or given a reading), spends and ``available`` agree with
    the plain model at every step, across bucket edges and whole windows skipped."""
    clock = FakeClock()
    budget = RetryBudget(ratio=ratio, min_per_second=floor, window=10, clock=clock)
    model = _Model(ratio, floor)
    for advance, operation in steps:
        clock.advance(advance)
        now = clock.monotonic()
        if operation == "deposit":
            budget.deposit()
            model.deposit(now)
        elif operation == "deposit_reading":
            budget.deposit(now, clock)
            model.deposit(now)
        elif operation == "try_spend":
            assert budget.try_spend() == model.try_spend(now)
        assert budget.available == model.available(now)


def test_a_reading_of_another_clock_is_not_used() -> None:
    """``deposit(now, clock)`` uses ``now`` only when ``clock`` is the budget's (or ``None``):
    a reading of another clock 25 s ahead would have moved the window past the first deposit."""
    clock = FakeClock()
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=10, clock=clock)
    budget.deposit(0.0, clock)
    budget.deposit(25.0, FakeClock(25.0))
    assert budget.available == 2
    budget.deposit(25.0)  # a reading of the budget's own clock: the window moves on
    clock.advance(25.0)
    assert budget.available == 1
