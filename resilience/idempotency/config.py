"""The ``[idempotency]`` policy section.

Example::

    [idempotency]
    store = "sqlite"                # sqlite (default), redis, postgres, memory
    path = ".resilience/idempotency.sqlite3"   # sqlite
    # url = "postgresql://postgres@127.0.0.1/test"   # postgres (required); redis: default the
    #                                               # consumer's backend
    # table = "resilience_idempotency"              # postgres
    header = "idempotency-key"      # identity from this header (default: the broker message id)
    # key = "myapp.ids:order_id"    # or a function of the delivery
    lease = 60.0                    # seconds a claim lasts (longer than the handler may take)
    ttl = 86400.0                   # seconds a completion record is kept
    wait = 5.0                      # seconds a duplicate in progress elsewhere waits
    namespace = ""                  # prefix of every key
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._config import Reader
from ..errors import ConfigError
from ._store import IdempotencyStore
from .layer import Idempotency, KeyFunction
from .memory import MemoryStore
from .sqlite import DEFAULT_PATH, SQLiteStore

if TYPE_CHECKING:
    from ..types import BuildContext

__all__ = ["STORES", "IdempotencyConfig", "policy_section"]

STORES = ("sqlite", "redis", "postgres", "memory")
"""Where ``[idempotency]`` can keep its records."""

ORDER = 25
"""Position in the pipeline: inside dead-letter routing (20), outside the total timeout (30)."""


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    """``[idempotency]``: see :class:`~resilience.idempotency.Idempotency`."""

    store: str = "sqlite"
    path: str = DEFAULT_PATH
    url: str | None = None
    table: str = "resilience_idempotency"
    header: str | None = None
    key: str | None = None
    lease: float = 60.0
    ttl: float = 86400.0
    wait: float = 5.0
    namespace: str = ""


def resolve_key(spec: str) -> KeyFunction:
    """Import ``"package.module:function"`` (the ``key`` option).

    Raises:
        ConfigError: malformed, not importable, or not callable.
    """
    from ..dead_letter.config import resolve_validator

    function: Any = resolve_validator(spec, "idempotency.key")
    key: KeyFunction = function
    return key


class IdempotencySection:
    """Parses ``[idempotency]`` and builds its middleware (``policy_section``)."""

    name = "idempotency"
    order = ORDER

    def parse(self, reader: Reader) -> IdempotencyConfig | None:
        """Validate the section (``enabled = false`` turns it off).

        Raises:
            ConfigError: an unknown key, a wrong type or an impossible value.
        """
        d = IdempotencyConfig()
        enabled = reader.boolean("enabled", True)
        config = IdempotencyConfig(
            store=reader.string("store", d.store, choices=STORES),
            path=reader.string("path", d.path),
            url=reader.string("url", None),
            table=reader.string("table", d.table),
            header=reader.string("header", None),
            key=reader.string("key", None),
            lease=reader.seconds("lease", d.lease, positive=True),
            ttl=reader.seconds("ttl", d.ttl, positive=True),
            wait=reader.seconds("wait", d.wait),
            namespace=reader.string("namespace", d.namespace),
        )
        reader.finish()
        if not enabled:
            return None
        if config.store == "postgres" and not config.url:
            raise ConfigError("idempotency.url is required with store = 'postgres'")
        if config.header is not None and config.key is not None:
            raise ConfigError("idempotency: set header or key, not both")
        if config.header == "":
            raise ConfigError("idempotency.header must not be empty")
        if config.key is not None:
            resolve_key(config.key)
        return config

    def to_dict(self, config: IdempotencyConfig | None) -> dict[str, Any]:
        """Plain data in the TOML layout (unset optional keys omitted)."""
        if config is None:
            return {"enabled": False}
        data: dict[str, Any] = {
            "store": config.store,
            "path": config.path,
            "table": config.table,
            "lease": config.lease,
            "ttl": config.ttl,
            "wait": config.wait,
            "namespace": config.namespace,
        }
        for name in ("url", "header", "key"):
            value = getattr(config, name)
            if value is not None:
                data[name] = value
        return data

    def middleware(
        self, config: IdempotencyConfig | None, context: BuildContext
    ) -> Idempotency | None:
        """An :class:`Idempotency` layer on the configured store.

        Raises:
            ConfigError: ``store = 'redis'`` without ``url`` and without a Redis backend.
        """
        if config is None:
            return None
        store: IdempotencyStore
        if config.store == "sqlite":
            store = SQLiteStore(config.path)
        elif config.store == "memory":
            store = MemoryStore(clock=context.clock)
        elif config.store == "postgres":
            from .postgres import PostgresStore

            store = PostgresStore(str(config.url), table=config.table)
        else:
            store = _redis_store(config, context)
        return Idempotency(
            store,
            key=None if config.key is None else resolve_key(config.key),
            header=config.header,
            lease=config.lease,
            ttl=config.ttl,
            wait=config.wait,
            namespace=config.namespace,
            clock=context.clock,
        )


def _redis_store(config: IdempotencyConfig, context: BuildContext) -> IdempotencyStore:
    from abe.backends.message_queue.service.redis import RedisBackend

    from .redis import RedisStore

    backend = context.backend
    if config.url is None:
        if not isinstance(backend, RedisBackend):
            raise ConfigError(
                "idempotency.store = 'redis' needs idempotency.url, or a RedisBackend consumer"
            )
        return RedisStore(backend=backend)
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(config.url)
    same = isinstance(backend, RedisBackend) and backend.settings.url == config.url
    return RedisStore(client, backend=backend if same else None)  # type: ignore[arg-type]


policy_section = IdempotencySection()
"""The ``[idempotency]`` section, found by :mod:`resilience.policy` through this name."""
