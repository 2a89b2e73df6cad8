"""An example of a user-defined scenario for ``resilience bench policies``.

Run it with::

    resilience bench policies --scenario benchmarks.scenarios:FlakyDeploy \
        --scenario "benchmarks.scenarios:FlakyDeploy:error_rate=0.8"

A scenario subclasses :class:`resilience.bench.Scenario` (a dataclass: its fields are the
parameters, settable as ``key=value`` on the command line) and overrides ``reply``. It draws
randomness only from ``self.rng`` so the same seed gives the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from resilience.bench import DependencyDown, Reply, Scenario


@dataclass(slots=True)
class FlakyDeploy(Scenario):
    """A rolling deploy every ``every`` seconds: for ``window`` seconds a share of calls fails."""

    name: ClassVar[str] = "flaky_deploy"
    summary: ClassVar[str] = "rolling deploys that fail a share of calls for a while"

    every: float = 900.0
    window: float = 120.0
    error_rate: float = 0.5

    def reply(self, now: float, poison: bool) -> Reply:
        """Fail ``error_rate`` of the calls inside a deploy window, else answer normally."""
        if now % self.every < self.window and self.rng.random() < self.error_rate:
            return Reply(self.healthy(), DependencyDown("instance restarting"))
        return Scenario.reply(self, now, poison)
