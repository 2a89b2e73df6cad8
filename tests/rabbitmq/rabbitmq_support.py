"""Helpers shared by the RabbitMQ backend tests."""

from __future__ import annotations

import uuid


class Queues:
    """Names of the test's queues; every one (and the ones derived from it) is deleted later."""

    def __init__(self) -> None:
        self.prefix = f"abe-test-{uuid.uuid4().hex[:12]}"
        self.exchange = f"{self.prefix}.dlx"
        self.names: set[str] = set()

    def __call__(self, name: str = "q") -> str:
        queue = f"{self.prefix}.{name}"
        self.names.add(queue)
        return queue
