"""Suite-wide isolation: commands run in-process may configure logging; undo it per test."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _restore_logging_configuration() -> Iterator[None]:
    """Restore structlog's configuration and the root logger after every test."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**structlog_config)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


POSTGRES_DSN = os.environ.get("POSTGRES_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def postgres_table() -> AsyncIterator[tuple[str, str]]:
    """``(dsn, table name)`` on a PostgreSQL that answers: a table name no other test uses,
    whose tables (``<name>`` and ``<name>_*``) are dropped afterwards. Skips with the reason when
    PostgreSQL does not answer, but fails under ``CI=true``."""
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = await psycopg.AsyncConnection.connect(POSTGRES_DSN, connect_timeout=2)
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {POSTGRES_DSN} does not answer ({type(exc).__name__}: {exc})"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI=true, so database tests must run, not skip")
        pytest.skip(reason)
    table = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield POSTGRES_DSN, table
    finally:
        await conn.set_autocommit(True)
        for suffix in ("", "_idem"):
            await conn.execute(f"DROP TABLE IF EXISTS {table}{suffix}")
        await conn.close()
