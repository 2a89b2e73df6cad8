"""The ``[dead_letter]`` policy section.

Example TOML::

    [dead_letter]
    destination = "sqlite"          # sqlite | backend | memory
    path = ".resilience/dead-letters.sqlite3"   # sqlite: relative to the current directory
    key_suffix = ".dlq"             # backend: dead letters of "orders" go to "orders.dlq"
    redact = ["password", "token", "authorization"]
    max_envelope_bytes = 262144
    max_traceback_frames = 30
    service_name = "billing"
    validate = "myapp.schemas:check_order"      # optional: raise or return False if invalid
    write_failure_backoff = 5.0     # cap (seconds) on the wait after a failed write
    write_attempts = 3              # writes tried per delivery before it is released
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from abe.backends.message_queue.service.memory import MemoryBackend

from .._config import Reader
from ..errors import ConfigError
from .envelope import DEFAULT_REDACT, EnvelopeOptions
from .middleware import DeadLetterRouter, Validator
from .sinks import BackendSink, DeadLetterSink, MemoryStore
from .sqlite import DEFAULT_PATH, SQLiteStore

if TYPE_CHECKING:
    from abe.backends.message_queue.base import MessageQueueBackend

    from ..types import BuildContext

__all__ = ["DESTINATIONS", "DeadLetterConfig", "policy_section", "resolve_validator"]

DESTINATIONS = ("sqlite", "backend", "memory")
"""Where ``[dead_letter]`` can send envelopes."""

ORDER = 20
"""Position in the pipeline (telemetry 10 is outside it, the total timeout 30 inside)."""


@dataclass(frozen=True, slots=True)
class DeadLetterConfig:
    """``[dead_letter]``: see :class:`~resilience.dead_letter.DeadLetterRouter`."""

    destination: str = "sqlite"
    path: str = DEFAULT_PATH
    key_suffix: str = ".dlq"
    key: str | None = None
    redact: tuple[str, ...] = DEFAULT_REDACT
    max_envelope_bytes: int = 256 * 1024
    max_traceback_frames: int = 30
    max_traceback_bytes: int = 16 * 1024
    service_name: str | None = None
    validate: str | None = None
    write_failure_backoff: float = 5.0
    write_attempts: int = 3

    def options(self) -> EnvelopeOptions:
        """The envelope options."""
        return EnvelopeOptions(
            redact=self.redact,
            max_envelope_bytes=self.max_envelope_bytes,
            max_traceback_frames=self.max_traceback_frames,
            max_traceback_bytes=self.max_traceback_bytes,
            service_name=self.service_name,
        )


def resolve_validator(spec: str, path: str = "dead_letter.validate") -> Validator:
    """Import ``"package.module:function"``.

    Raises:
        ConfigError: malformed, not importable, or not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{path} must look like 'module:function', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{path}: cannot import {spec!r} ({exc})") from None
    if not callable(obj):
        raise ConfigError(f"{path}: {spec!r} is not callable")
    validator: Validator = obj
    return validator


def _system(backend: MessageQueueBackend | None) -> str | None:
    if backend is None:
        return None
    name = getattr(backend, "system", None)
    if isinstance(name, str) and name:
        return name
    cls = type(backend).__name__
    return (cls.removesuffix("Backend") or cls).lower()


def _handler_name(handler: object) -> str | None:
    if handler is None:
        return None
    qualname = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    module = getattr(handler, "__module__", None)
    return f"{module}.{qualname}" if module else str(qualname)


class DeadLetterSection:
    """Parses ``[dead_letter]`` and builds its middleware (``policy_section``)."""

    name = "dead_letter"
    order = ORDER

    def parse(self, reader: Reader) -> DeadLetterConfig:
        """Validate the section.

        Raises:
            ConfigError: an unknown key, a wrong type, an impossible value, or a validation hook
                that cannot be imported.
        """
        d = DeadLetterConfig()
        config = DeadLetterConfig(
            destination=reader.string("destination", d.destination, choices=DESTINATIONS),
            path=reader.string("path", d.path),
            key_suffix=reader.string("key_suffix", d.key_suffix),
            key=reader.string("key", None),
            redact=reader.strings("redact", d.redact),
            max_envelope_bytes=reader.integer("max_envelope_bytes", d.max_envelope_bytes),
            max_traceback_frames=reader.integer("max_traceback_frames", d.max_traceback_frames),
            max_traceback_bytes=reader.integer("max_traceback_bytes", d.max_traceback_bytes),
            service_name=reader.string("service_name", None),
            validate=reader.string("validate", None),
            write_failure_backoff=reader.seconds("write_failure_backoff", d.write_failure_backoff),
            write_attempts=reader.integer("write_attempts", d.write_attempts, minimum=1),
        )
        reader.finish()
        if not config.path:
            raise ConfigError("dead_letter.path must not be empty")
        if config.destination == "backend" and not (config.key or config.key_suffix):
            raise ConfigError("dead_letter: the backend destination needs key_suffix or key")
        try:
            config.options()
        except ConfigError as exc:
            raise ConfigError(f"dead_letter.{exc}") from None
        if config.validate is not None:
            resolve_validator(config.validate)
        return config

    def to_dict(self, config: DeadLetterConfig) -> dict[str, Any]:
        """Plain data in the TOML layout (unset optional keys omitted)."""
        data: dict[str, Any] = {
            "destination": config.destination,
            "path": config.path,
            "key_suffix": config.key_suffix,
            "redact": list(config.redact),
            "max_envelope_bytes": config.max_envelope_bytes,
            "max_traceback_frames": config.max_traceback_frames,
            "max_traceback_bytes": config.max_traceback_bytes,
            "write_failure_backoff": config.write_failure_backoff,
            "write_attempts": config.write_attempts,
        }
        for name in ("key", "service_name", "validate"):
            value = getattr(config, name)
            if value is not None:
                data[name] = value
        return data

    def middleware(self, config: DeadLetterConfig, context: BuildContext) -> DeadLetterRouter:
        """A :class:`DeadLetterRouter` writing to the configured destination.

        Raises:
            ConfigError: the ``backend`` destination without a backend, or with a
                ``MemoryBackend`` that also reads the dead-letter key.
        """
        sink: DeadLetterSink
        if config.destination == "sqlite":
            sink = SQLiteStore(config.path)
        elif config.destination == "memory":
            sink = MemoryStore()
        else:
            backend = context.backend
            if backend is None:
                raise ConfigError(
                    "dead_letter.destination = 'backend' needs the consumer's backend; use "
                    "'sqlite' or 'memory' with @resilient"
                )
            if isinstance(backend, MemoryBackend) and backend.keys is None:
                raise ConfigError(
                    "dead_letter.destination = 'backend': this MemoryBackend reads every key, so "
                    "it would consume its own dead letters; create it with "
                    "MemoryBackend(keys=[...]) or use destination 'sqlite'"
                )
            sink = BackendSink(backend, key_suffix=config.key_suffix, key=config.key)
        return DeadLetterRouter(
            sink,
            classifier=context.classifier,
            clock=context.clock,
            options=config.options(),
            validate=None if config.validate is None else resolve_validator(config.validate),
            handler_name=_handler_name(context.handler),
            system=_system(context.backend),
            write_failure_backoff=config.write_failure_backoff,
            write_attempts=config.write_attempts,
        )


policy_section = DeadLetterSection()
"""The ``[dead_letter]`` section, found by :mod:`resilience.policy` through this name."""
