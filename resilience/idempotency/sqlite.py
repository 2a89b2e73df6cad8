"""Claims and completion records in one SQLite file (the embedded default).

Durability is that of the dead-letter store: WAL mode, every write committed with
``synchronous=FULL`` (flushed to disk) before it counts, one short-lived connection per operation
in a worker thread, so any number of consumer processes on one machine can share the file.
Leases and TTLs are wall-clock times (``time.time``), comparable across those processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ._store import ClaimLost, ClaimState

if TYPE_CHECKING:
    from ..delivery import Delivery

__all__ = ["DEFAULT_PATH", "SQLiteStore"]

DEFAULT_PATH = ".resilience/idempotency.sqlite3"
"""Where the store lives by default, relative to the current directory."""

_DONE = ""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
"""


class SQLiteStore:
    """Idempotency records in a SQLite file.

    Args:
        path: The database file; parent directories are created on first use.
        busy_timeout: Seconds a writer waits for another connection's lock before failing.
        now: Wall-clock time source for leases and TTLs (``time.time``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        busy_timeout: float = 10.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        self.busy_timeout = float(busy_timeout)
        self._now = now
        self._ready = False
        self._init_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self._ready or not self.path.exists():
            self._initialise()
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    def _initialise(self) -> None:
        with self._init_lock:
            if self._ready and self.path.exists():
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            finally:
                conn.close()
            self._ready = True

    # -- blocking operations (worker threads) ------------------------------------------------

    def _claim(self, key: str, owner: str, lease: float) -> ClaimState:
        now = self._now()
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT owner FROM idempotency WHERE key = ? AND expires_at > ?", (key, now)
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO idempotency (key, owner, expires_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, "
                        "expires_at = excluded.expires_at",
                        (key, owner, now + lease),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        if row is None:
            return ClaimState.CLAIMED
        return ClaimState.COMPLETED if row[0] == _DONE else ClaimState.BUSY

    def _complete(self, key: str, owner: str, ttl: float) -> bool:
        now = self._now()
        with self._connect() as conn:
            # Ours, or lapsed and nobody else's since: write the record.
            cursor = conn.execute(
                "INSERT INTO idempotency (key, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE idempotency.owner = ? OR idempotency.expires_at <= ?",
                (key, _DONE, now + ttl, owner, now),
            )
            return cursor.rowcount == 1

    def _release(self, key: str, owner: str) -> None:
        with self._connect() as conn:
            conn.execute("DELETE FROM idempotency WHERE key = ? AND owner = ?", (key, owner))

    def _purge(self) -> int:
        with self._connect() as conn:
            cursor = conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (self._now(),))
            return cursor.rowcount

    # -- the store protocol ----------------------------------------------------------------

    async def claim(self, key: str, owner: str, lease: float) -> ClaimState:
        """Claim ``key`` (see :meth:`~resilience.idempotency.IdempotencyStore.claim`)."""
        return await asyncio.to_thread(self._claim, key, owner, lease)

    @contextlib.asynccontextmanager
    async def complete(
        self, key: str, owner: str, ttl: float, delivery: Delivery
    ) -> AsyncIterator[None]:
        """Write the completion record after the handler returns.

        Raises:
            ClaimLost: another consumer took the claim over while the handler ran.
        """
        yield None
        if not await asyncio.to_thread(self._complete, key, owner, ttl):
            raise ClaimLost(f"the claim on {key!r} was taken over while the handler ran")

    async def release(self, key: str, owner: str) -> None:
        """Drop ``owner``'s claim on ``key``."""
        await asyncio.to_thread(self._release, key, owner)

    async def purge(self) -> int:
        """Delete expired claims and records.

        Returns:
            How many rows were deleted.
        """
        return await asyncio.to_thread(self._purge)
