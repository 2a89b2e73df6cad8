"""Running a consumer as a service: the broker connection wait, the consumer holder that drains
and reloads it, and the HTTP endpoint (health, readiness, Prometheus metrics, breaker control).

``resilience run`` is built on these; they sit below the CLI so the benchmarks can measure them.
"""

from __future__ import annotations

from .connect import BrokerUnreachable, await_broker, broker_address, connection_of
from .http import EndpointError, HttpEndpoint, parse_address
from .service import Service

__all__ = [
    "BrokerUnreachable",
    "EndpointError",
    "HttpEndpoint",
    "Service",
    "await_broker",
    "broker_address",
    "connection_of",
    "parse_address",
]
