"""The encoded body size travels with each Redis delivery."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest

pytestmark = pytest.mark.broker


async def test_delivery_knows_its_body_size(make_backend: Any, prefix: str, client: Any) -> None:
    """A delivery's body_size is the byte length of the stored JSON data field."""
    backend = make_backend()
    payload = {"order": 7, "note": "héllo"}
    await backend.publish(f"{prefix}s", payload)
    entries = await client.xrange(f"{prefix}s")
    assert len(entries) == 1
    stored = entries[0][1][b"data"]
    assert json.loads(stored) == payload
    async with contextlib.aclosing(backend.deliveries(group="g")) as deliveries:
        message = await anext(deliveries)
    assert message.payload == payload
    assert message.body_size == len(stored)
    await backend.ack(message)
