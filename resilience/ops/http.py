"""The health, metrics and admin endpoint of ``resilience run --http HOST:PORT``.

Served by aiohttp's ``AppRunner`` on the consumer's own event loop: no thread, so handlers
read the consumer, the breakers and the connection status without locks, and a loop that is
stuck shows as a ``/healthz`` that does not answer. Routes:

* ``GET /healthz``: 200 while the event loop runs.
* ``GET /readyz``: 200 when ready (broker connected, not draining, no breaker open), else 503;
  the JSON body lists the reasons.
* ``GET /metrics``: the OpenTelemetry instruments in the Prometheus text format.
* ``GET /breakers``; ``POST /breakers/{name}/{open|close|reset}``: runtime breaker control.
* ``POST /policy/reload``: read the policy file again (like ``SIGHUP``).

It is an admin surface: anyone who reaches it can stop consumption. It binds to loopback unless
told otherwise.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from resilience.errors import ConfigError
from resilience.ops.service import BREAKER_ACTIONS, breaker_info, breakers, control_breaker

if TYPE_CHECKING:
    from aiohttp import web

    from resilience.ops.service import Service
    from resilience.prometheus import PrometheusMetrics

__all__ = ["DEFAULT_HOST", "EndpointError", "HttpEndpoint", "parse_address"]

DEFAULT_HOST = "127.0.0.1"


class EndpointError(ConfigError):
    """The ``--http`` address is malformed or cannot be bound (one line for the CLI)."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (loopback) as ``(host, port)``.

    Raises:
        EndpointError: not an address with a port in 0-65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise EndpointError(f"--http must look like HOST:PORT (e.g. 127.0.0.1:9464), got {text!r}")
    host = host.strip("[]") or DEFAULT_HOST
    return host, int(port_text)


def _json(data: Any, status: int = 200) -> web.Response:
    from aiohttp import web

    return web.Response(
        text=json.dumps(data, indent=1) + "\n", status=status, content_type="application/json"
    )


class HttpEndpoint:
    """The endpoint's aiohttp application, started and stopped with the consumer.

    Args:
        service: The running consumer.
        metrics: The Prometheus reader whose registry ``/metrics`` renders (``None``: 404).
    """

    def __init__(self, service: Service, metrics: PrometheusMetrics | None) -> None:
        self.service = service
        self.metrics = metrics
        self._runner: web.AppRunner | None = None
        self.address = ""
        """``host:port`` actually bound (the port the OS chose for port 0)."""

    def app(self) -> web.Application:
        """The application with every route."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/breakers", self._breakers)
        app.router.add_post("/breakers/{name}/{action}", self._control)
        app.router.add_post("/policy/reload", self._reload)
        return app

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port``; returns the bound ``host:port``.

        Raises:
            EndpointError: the address cannot be bound (in use, not local).
        """
        from aiohttp import web

        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise EndpointError(
                f"--http {host}:{port}: cannot listen: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        bound_port = port
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or ()
        for sock in sockets:
            bound_port = sock.getsockname()[1]
            break
        self.address = f"{host}:{bound_port}"
        return self.address

    async def stop(self) -> None:
        """Stop listening (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- routes ---------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"alive": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, body = self.service.readiness()
        return _json(body, 200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web

        if self.metrics is None:
            return _json({"error": "metrics are off"}, 404)
        from resilience.prometheus import CONTENT_TYPE

        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _breakers(self, request: web.Request) -> web.Response:
        return _json({"breakers": [breaker_info(b) for b in breakers()]})

    async def _control(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        action = request.match_info["action"]
        if action not in BREAKER_ACTIONS:
            allowed = ", ".join(BREAKER_ACTIONS)
            return _json({"error": f"action must be one of {allowed}; got {action!r}"}, 404)
        info = control_breaker(name, action)
        if info is None:
            known = [b.name for b in breakers()]
            return _json({"error": f"no circuit breaker named {name!r}", "known": known}, 404)
        return _json(info)

    async def _reload(self, request: web.Request) -> web.Response:
        result = await self.service.reload("HTTP")
        return _json({"reloaded": result.ok, "message": result.message}, 200 if result.ok else 409)
