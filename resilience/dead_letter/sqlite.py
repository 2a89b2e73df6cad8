"""A durable dead-letter store in one SQLite file: no server, survives restarts.

Every operation opens its own short-lived connection in a worker thread
(:func:`asyncio.to_thread`), so the event loop never blocks on disk, any number of writers in one
process (or in several, such as a consumer and ``resilience dlq purge``) are safe, and there is
no connection to close. SQLite serialises writers; the database runs in WAL mode so readers never
wait for them, and a write counts as confirmed only after it is committed with
``synchronous=FULL`` (flushed to disk).

Writes are group-committed: envelopes that arrive while a commit is on its way to disk wait for
it and then go to disk together, in one transaction and one flush. Each :meth:`SQLiteStore.write`
still returns only once the transaction holding its envelope is committed, and fails when that
transaction fails, so a message is never acknowledged before its dead letter is durable; what
changes is that a thousand concurrent dead letters cost a few flushes instead of a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._limits import dumps
from .envelope import SCHEMA
from .sinks import AmbiguousId, DeadLetterRecord, Filter

if TYPE_CHECKING:
    from ..delivery import Delivery

__all__ = ["DEFAULT_PATH", "SQLiteStore", "StoreVersionError", "encoded_writer"]

DEFAULT_PATH = ".resilience/dead-letters.sqlite3"
"""Where the store lives by default, relative to the current directory."""

_VERSION = 1


class StoreVersionError(RuntimeError):
    """The database was written by a newer version of the store."""


_COLUMNS = "id, envelope, stored_at, replayed_at, replay_target, replays"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    dead_lettered_at REAL NOT NULL,
    stored_at REAL NOT NULL,
    reason TEXT NOT NULL,
    stage TEXT NOT NULL,
    error_type TEXT NOT NULL,
    error_name TEXT NOT NULL,
    key TEXT,
    replay_count INTEGER NOT NULL DEFAULT 0,
    replayed_at REAL,
    replay_target TEXT,
    replays INTEGER NOT NULL DEFAULT 0,
    envelope TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters (reason);
CREATE INDEX IF NOT EXISTS dead_letters_key ON dead_letters (key);
CREATE INDEX IF NOT EXISTS dead_letters_at ON dead_letters (dead_lettered_at);
"""
_CHUNK = 500  # ids per statement (SQLite's variable limit is 32766 since 3.32; stay modest)
_INSERT = (
    "INSERT INTO dead_letters (id, dead_lettered_at, stored_at, reason, stage, "
    "error_type, error_name, key, replay_count, envelope) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
_GROUP_LIMIT = 1000
"""Envelopes per transaction at most (a bigger backlog is committed in several)."""

_Row = tuple[Any, ...]


@dataclass(slots=True)
class _Group:
    """The group commit of one event loop: envelopes waiting for the next transaction."""

    waiting: list[tuple[_Row, asyncio.Future[None]]] = field(default_factory=list)
    committer: asyncio.Task[None] | None = None


class SQLiteStore:
    """Dead letters in a SQLite file (the default destination).

    Args:
        path: The database file; parent directories are created on first write. Relative paths
            are resolved against the current directory when the store is created.
        create: When ``False``, operations raise :class:`FileNotFoundError` instead of creating
            a missing file (what the read-only CLI commands want).
        busy_timeout: Seconds a writer waits for another connection's lock before failing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        create: bool = True,
        busy_timeout: float = 10.0,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        self.create = create
        self.busy_timeout = float(busy_timeout)
        self._ready = False
        self._init_lock = threading.Lock()
        self._groups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Group] = (
            weakref.WeakKeyDictionary()
        )
        self.commits = 0
        """Transactions committed by :meth:`write` (group commit: often fewer than writes)."""

    @property
    def name(self) -> str:
        """``sqlite:<absolute path>``."""
        return f"sqlite:{self.path}"

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    def exists(self) -> bool:
        """Whether the database file exists."""
        return self.path.exists()

    # -- connections (worker threads only) --------------------------------------------------------

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
            if not self.path.exists():
                if not self.create:
                    raise FileNotFoundError(f"no dead-letter store at {self.path}")
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > _VERSION:
                    raise StoreVersionError(
                        f"{self.path} holds dead-letter store version {version}; this version "
                        f"of resilience reads up to {_VERSION}: upgrade it"
                    )
                if version < _VERSION:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.executescript(
                        f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={_VERSION};COMMIT;"
                    )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                conn.close()
            self._ready = True

    # -- blocking operations ---------------------------------------------------------------------

    def _write_rows(self, rows: Sequence[_Row]) -> None:
        """Insert ``rows`` in one transaction; returns once it is committed to disk."""
        stored_at = time.time()
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, [(*row[:2], stored_at, *row[2:]) for row in rows])
                self._commit(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _select(
        self, where: Filter | None, limit: int | None, newest_first: bool
    ) -> list[DeadLetterRecord]:
        clause, params = _where(where)
        sql = f"SELECT {_COLUMNS} FROM dead_letters{clause} ORDER BY seq"
        if newest_first:
            sql += " DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._connect() as conn:
            return [_record(row) for row in conn.execute(sql, params)]

    def _get(self, id_or_prefix: str) -> DeadLetterRecord | None:
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM dead_letters WHERE id = ?", (id_or_prefix,)
            ).fetchone()
            if row is not None:
                return _record(row)
            pattern = _escape_like(id_or_prefix) + "%"
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM dead_letters WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
                (pattern,),
            ).fetchall()
        if len(rows) > 1:
            raise AmbiguousId(f"{id_or_prefix!r} matches several dead letters")
        return _record(rows[0]) if rows else None

    def _mark(self, record_id: str, target: str, at: float) -> bool:
        with self._connect() as conn:
            cursor = conn.execute(
                "UPDATE dead_letters SET replayed_at = ?, replay_target = ?, "
                "replays = replays + 1 WHERE id = ?",
                (at, target, record_id),
            )
            return cursor.rowcount > 0

    def _purge(self, where: Filter | None) -> int:
        chunks = [where]
        if where is not None and len(where.ids) > _CHUNK:
            ids = where.ids
            chunks = [replace(where, ids=ids[i : i + _CHUNK]) for i in range(0, len(ids), _CHUNK)]
        removed = 0
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for chunk in chunks:
                    clause, params = _where(chunk)
                    removed += conn.execute(f"DELETE FROM dead_letters{clause}", params).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return removed

    def _counts(self, where: Filter | None) -> dict[str, int]:
        clause, params = _where(where)
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT reason, COUNT(*) FROM dead_letters{clause} GROUP BY reason "
                "ORDER BY reason",
                params,
            ).fetchall()
        return {str(reason): int(n) for reason, n in rows}

    # -- the store protocol ------------------------------------------------------------------------

    async def write(self, envelope: Mapping[str, Any], delivery: Delivery | None = None) -> None:
        """Insert ``envelope``; returns once it is committed to disk.

        Envelopes written concurrently share a transaction (group commit); this returns only
        after the commit of the one holding ``envelope``, and raises if that commit failed.
        Writing the same envelope id twice keeps the first.

        Raises:
            ValueError: ``envelope`` is not a dead-letter envelope.
            sqlite3.Error: the database is unwritable, locked past ``busy_timeout``, or corrupt
                (every envelope of the failed transaction gets the error; none was stored).
            OSError: the directory cannot be created.
        """
        await self._enqueue(_row(envelope, None))

    async def write_encoded(self, envelope: Mapping[str, Any], text: str) -> None:
        """:meth:`write`, with the envelope's compact JSON text already made.

        Args:
            envelope: The envelope.
            text: Exactly ``resilience.dead_letter._limits.dumps(envelope)`` (what an
                :class:`~.envelope.EnvelopeBuilder` hands out from ``encoded``); it is stored
                as is.

        Raises:
            ValueError, sqlite3.Error, OSError: as :meth:`write`.
        """
        await self._enqueue(_row(envelope, text))

    async def _enqueue(self, row: _Row) -> None:
        """Wait for the transaction that commits ``row`` (see :meth:`write`)."""
        loop = asyncio.get_running_loop()
        group = self._groups.get(loop)
        if group is None:
            group = self._groups[loop] = _Group()
        done: asyncio.Future[None] = loop.create_future()
        group.waiting.append((row, done))
        if group.committer is None:
            group.committer = loop.create_task(self._commit_groups(group))
        await done

    async def _commit_groups(self, group: _Group) -> None:
        """Commit what is waiting, one transaction at a time, until nothing is left."""
        try:
            await asyncio.sleep(0)  # writers started in the same turn of the loop join in
            while group.waiting:
                batch = group.waiting[:_GROUP_LIMIT]
                del group.waiting[:_GROUP_LIMIT]
                live = [(row, done) for row, done in batch if not done.done()]
                if not live:
                    continue
                try:
                    await asyncio.to_thread(self._write_rows, [row for row, _ in live])
                except asyncio.CancelledError:
                    for _, done in live:
                        done.cancel()
                    raise
                except Exception as exc:
                    for n, (_, done) in enumerate(live):
                        if not done.done():  # each writer raises an error object of its own
                            done.set_exception(exc if n == 0 else _copy_error(exc))
                    continue
                self.commits += 1
                for _, done in live:
                    if not done.done():
                        done.set_result(None)
        finally:
            group.committer = None
            for _, done in group.waiting:  # only when cancelled: nothing was written for these
                done.cancel()
            group.waiting.clear()

    async def find(
        self, where: Filter | None = None, *, limit: int | None = None, newest_first: bool = False
    ) -> list[DeadLetterRecord]:
        """Records matching ``where``, oldest first (newest first when asked)."""
        return await asyncio.to_thread(self._select, where, limit, newest_first)

    async def get(self, id_or_prefix: str) -> DeadLetterRecord | None:
        """The record with this id, or the only one whose id starts with it.

        Raises:
            AmbiguousId: several ids start with ``id_or_prefix``.
        """
        return await asyncio.to_thread(self._get, id_or_prefix)

    async def mark_replayed(self, id: str, *, target: str, at: float | None = None) -> bool:
        """Record a replay of ``id`` to ``target``; ``False`` when there is no such record."""
        return await asyncio.to_thread(self._mark, id, target, time.time() if at is None else at)

    async def purge(self, where: Filter | None = None) -> int:
        """Delete the records matching ``where`` (every record when ``None``); returns how many."""
        return await asyncio.to_thread(self._purge, where)

    async def counts(self, where: Filter | None = None) -> dict[str, int]:
        """Records matching ``where``, by reason."""
        return await asyncio.to_thread(self._counts, where)

    async def close(self) -> None:
        """Nothing to release (connections live for one operation)."""


_WRITE = SQLiteStore.write


def encoded_writer(sink: object) -> Callable[[Mapping[str, Any], str], Awaitable[None]] | None:
    """``sink.write_encoded`` when ``sink`` is a :class:`SQLiteStore` whose ``write`` is this
    module's own (not overridden or replaced), else ``None``."""
    if isinstance(sink, SQLiteStore) and getattr(sink.write, "__func__", None) is _WRITE:
        return sink.write_encoded
    return None


def _copy_error(exc: Exception) -> Exception:
    try:
        return copy.copy(exc)
    except Exception:
        return exc


def _row(envelope: Mapping[str, Any], text: str | None) -> _Row:
    """The columns of ``envelope`` except ``stored_at`` (set at commit time); ``text`` is its
    JSON when already encoded.

    Raises:
        ValueError: ``envelope`` is not a dead-letter envelope.
    """
    if envelope.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} envelope: schema={envelope.get('schema')!r}")
    error = envelope["error"]
    error_type = str(error["type"])
    return (
        str(envelope["id"]),
        float(envelope["dead_lettered_at"]),
        str(error["reason"]),
        str(error["stage"]),
        error_type,
        error_type.rsplit(".", 1)[-1],
        envelope["source"]["key"],
        int(envelope.get("replay_count", 0)),
        dumps(envelope) if text is None else text,
    )


def _record(row: Sequence[Any]) -> DeadLetterRecord:
    record_id, envelope, stored_at, replayed_at, replay_target, replays = row
    return DeadLetterRecord(
        id=record_id,
        envelope=json.loads(envelope),
        stored_at=stored_at,
        replayed_at=replayed_at,
        replay_target=replay_target,
        replays=replays,
    )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _in(column: str, values: Sequence[Any], params: list[Any]) -> str:
    params.extend(values)
    return f"{column} IN ({', '.join('?' * len(values))})"


def _where(where: Filter | None) -> tuple[str, list[Any]]:
    params: list[Any] = []
    if where is None:
        return "", params
    terms: list[str] = []
    if where.ids:
        terms.append(_in("id", where.ids, params))
    if where.reasons:
        terms.append(_in("reason", where.reasons, params))
    if where.error_types:
        full = _in("error_type", where.error_types, params)
        short = _in("error_name", where.error_types, params)
        terms.append(f"({full} OR {short})")
    if where.keys:
        terms.append(_in("key", where.keys, params))
    if where.since is not None:
        terms.append("dead_lettered_at >= ?")
        params.append(where.since)
    if where.until is not None:
        terms.append("dead_lettered_at < ?")
        params.append(where.until)
    if where.replayed is not None:
        terms.append("replayed_at IS NOT NULL" if where.replayed else "replayed_at IS NULL")
    return (" WHERE " + " AND ".join(terms) if terms else ""), params
