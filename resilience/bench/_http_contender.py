"""The ``pipeline+http endpoint`` contender of ``resilience bench overhead``.

The full default pipeline (as the ``pipeline`` row) with the health and admin endpoint of
``resilience run --http`` listening on a free loopback port of the same event loop, and a
client scraping ``/readyz`` and ``/breakers`` every 50 ms while the messages drain. The ratio
against ``pipeline`` is what the endpoint costs per message (the metrics it would expose are
recorded by the telemetry layer, whose cost the telemetry rows measure).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from resilience.consumer import ResilientConsumer

from ._contenders import Unavailable, _Contender, _same, full_pipeline_policy

if TYPE_CHECKING:
    from abe.backends.message_queue.service.memory import MemoryBackend

    from ._contenders import Consumer, Wrap

__all__ = ["HTTP_CONTENDERS", "http_ratios"]

_SCRAPE_EVERY = 0.05


class _WithEndpoint(ResilientConsumer):
    """A ResilientConsumer whose run also serves (and scrapes) the ``--http`` endpoint."""

    async def run(self, handler: Any) -> None:
        from aiohttp import ClientSession

        from resilience.ops.http import HttpEndpoint
        from resilience.ops.service import Service

        service = Service(self.backend, handler, None, lambda _: self, None)
        service.consumer = self
        service.run_task = asyncio.current_task()
        endpoint = HttpEndpoint(service, None)
        address = await endpoint.start("127.0.0.1", 0)

        async def scrape() -> None:
            async with ClientSession() as session:
                while True:
                    for path in ("/readyz", "/breakers"):
                        async with session.get(f"http://{address}{path}") as response:
                            await response.read()
                    await asyncio.sleep(_SCRAPE_EVERY)

        scraper = asyncio.create_task(scrape())
        try:
            await super().run(handler)
        finally:
            scraper.cancel()
            with contextlib.suppress(BaseException):
                await scraper
            await endpoint.stop()


def _pipeline_http(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"aiohttp is not installed ({exc})") from None
    return _WithEndpoint(backend, policy=full_pipeline_policy()), _same


HTTP_CONTENDERS: tuple[_Contender, ...] = (
    _Contender(
        "pipeline+http endpoint",
        "the pipeline row with the `resilience run --http` endpoint in the same loop, "
        "/readyz and /breakers scraped every 50 ms",
        _pipeline_http,
    ),
)


def http_ratios(per_message: dict[str, float]) -> list[dict[str, Any]]:
    """The endpoint's ratio row: ``pipeline+http endpoint`` over ``pipeline``.

    Args:
        per_message: Seconds per message by contender.

    Returns:
        One ratio row in the overhead report's format (none when a figure is missing).
    """
    on = per_message.get("pipeline+http endpoint")
    off = per_message.get("pipeline")
    value = on / off if on and off else None
    return [
        {
            "name": "http endpoint on / off",
            "value": value,
            "target": "<= 1.05",
            "met": None if value is None else value <= 1.05,
            "how": "per-message cost of the pipeline with the --http endpoint serving and "
            "scraped every 50 ms, over the same pipeline without it",
            "note": None,
        }
    ]
