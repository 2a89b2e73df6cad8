"""``resilience dlq list | show | replay | purge``: inspect and replay dead letters.

The commands read the SQLite dead-letter store: ``--db PATH``, else the ``path`` of the
``[dead_letter]`` section of ``--policy FILE`` / the ``RESILIENCE_DEAD_LETTER__PATH`` environment
variable, else ``.resilience/dead-letters.sqlite3`` in the current directory. ``--store
rabbitmq:QUEUE`` or ``--store nats:STREAM[/SUBJECT]`` reads the dead letters a RabbitMQ or NATS
backend keeps on the broker instead. ``replay`` publishes through ``load_backend()``'s backend
(``QUEUE_BACKEND`` picks it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import sqlite3
import sys
import warnings
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from resilience.cli import CliError
from resilience.dead_letter import (
    DEFAULT_PATH,
    REASONS,
    AmbiguousId,
    DeadLetterRecord,
    Filter,
    ReplayReport,
    SQLiteStore,
    StoreVersionError,
    replay,
)
from resilience.dead_letter.render import render_record, render_report, render_table

if TYPE_CHECKING:
    from resilience.dead_letter.broker_stores import NATSStore, RabbitMQStore

__all__ = ["register"]

T = TypeVar("T")

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def register(subparsers: Any) -> None:
    """Add the ``dlq`` sub-command and its own sub-commands."""
    parser = subparsers.add_parser(
        "dlq",
        help="list, inspect, replay and purge dead letters",
        description="Work with the dead-letter store (SQLite). The store is --db PATH, else the "
        "[dead_letter] path of --policy FILE or RESILIENCE_DEAD_LETTER__PATH, else "
        f"{DEFAULT_PATH} in the current directory.",
    )
    parser.set_defaults(func=lambda _args: _usage(parser))
    commands = parser.add_subparsers(dest="dlq_command", metavar="COMMAND")

    store = argparse.ArgumentParser(add_help=False)
    group = store.add_argument_group("store")
    group.add_argument("--db", metavar="PATH", help="the SQLite dead-letter store")
    group.add_argument(
        "--store",
        metavar="URI",
        help="dead letters kept on a broker: rabbitmq:QUEUE (RABBITMQ_URL) or "
        "nats:STREAM[/SUBJECT] (NATS_URL); sqlite:PATH is the same as --db PATH",
    )
    group.add_argument(
        "--policy", metavar="FILE", help="read the store path from this policy's [dead_letter]"
    )

    filters = argparse.ArgumentParser(add_help=False)
    sel = filters.add_argument_group("filters (repeat an option to match any of its values)")
    sel.add_argument(
        "--reason",
        action="append",
        default=[],
        choices=REASONS,
        metavar="REASON",
        help=f"one of {', '.join(REASONS)}",
    )
    sel.add_argument(
        "--error-type",
        action="append",
        default=[],
        metavar="NAME",
        help="exception name, bare (ValueError) or dotted (myapp.errors.Invalid)",
    )
    sel.add_argument("--key", action="append", default=[], metavar="KEY", help="source key")
    sel.add_argument(
        "--since", metavar="TIME", help="dead-lettered at or after TIME (ISO 8601 or 30m/2h/7d ago)"
    )
    sel.add_argument("--until", metavar="TIME", help="dead-lettered before TIME")
    sel.add_argument("--id", action="append", default=[], metavar="ID", help="id or id prefix")
    state = sel.add_mutually_exclusive_group()
    state.add_argument("--pending", action="store_true", help="only never-replayed ones")
    state.add_argument("--replayed", action="store_true", help="only replayed ones")

    lister = commands.add_parser(
        "list", parents=[store, filters], help="list dead letters (a table, or JSON)"
    )
    lister.add_argument("--limit", type=_positive_int, metavar="N", help="at most N, newest first")
    lister.add_argument("--json", action="store_true", help="print full records as JSON")
    lister.set_defaults(func=_list)

    show = commands.add_parser("show", parents=[store], help="show one dead letter")
    show.add_argument("envelope_id", metavar="ID", help="envelope id or a unique prefix")
    show.add_argument("--json", action="store_true", help="print the record as JSON")
    show.set_defaults(func=_show)

    rep = commands.add_parser(
        "replay",
        parents=[store, filters],
        help="republish dead letters to their key (or another)",
        description="Republish the original payloads through load_backend()'s backend "
        "(QUEUE_BACKEND picks it) with x-replay-count and the original traceparent. Each "
        "envelope is replayed once (see --force); messages replayed --max-replays times are "
        "refused. Exit code 1 when a publish fails (replay stops there).",
    )
    rep.add_argument("--to-key", metavar="KEY", help="publish to KEY instead of the source key")
    rep.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    rep.add_argument(
        "--rate", type=_positive_float, metavar="PER_SECOND", help="at most this many per second"
    )
    rep.add_argument(
        "--max-replays",
        type=_non_negative_int,
        default=3,
        metavar="N",
        help="refuse messages already replayed N times (default 3)",
    )
    rep.add_argument("--force", action="store_true", help="replay already-replayed ones again")
    rep.add_argument(
        "--allow-redacted",
        action="store_true",
        help="replay payloads whose redacted fields are masked",
    )
    rep.add_argument("--limit", type=_positive_int, metavar="N", help="at most N, oldest first")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    bar = rep.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="always show a progress bar")
    bar.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    rep.set_defaults(func=_replay)

    purge = commands.add_parser(
        "purge", parents=[store, filters], help="delete dead letters (asks first)"
    )
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=_purge)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# -- argument types ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_time(text: str, *, now: float | None = None) -> float:
    """``2026-05-01T12:00``, ``2026-05-01`` (UTC unless an offset is given) or ``30m``/``2h``/
    ``7d`` ago, as wall-clock seconds.

    Raises:
        CliError: the text is neither.
    """
    match = _RELATIVE.match(text.strip())
    if match:
        ago = float(match.group(1)) * _UNITS[match.group(2)]
        base = dt.datetime.now(dt.UTC).timestamp() if now is None else now
        return base - ago
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"cannot read time {text!r}: use ISO 8601 (2026-05-01T12:00Z) or 30m, 2h, 7d"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


# -- the store and the filter ----------------------------------------------------------------


def _store(args: argparse.Namespace) -> SQLiteStore | RabbitMQStore | NATSStore:
    spec: str | None = getattr(args, "store", None)
    if spec and not spec.startswith("sqlite:"):
        from resilience.dead_letter.broker_stores import open_broker_store

        if args.db:
            raise CliError("give --db or --store, not both")
        try:
            return open_broker_store(spec, os.environ)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    path: str = spec.removeprefix("sqlite:") if spec else args.db
    if not path:
        from resilience.cli._common import load_policy

        policy = load_policy(args.policy)
        config = policy.sections.get("dead_letter")
        if config is not None and config.destination != "sqlite":
            raise CliError(
                f"the policy sends dead letters to the {config.destination!r} destination; "
                "the dlq commands read a SQLite store: pass --db PATH"
            )
        path = config.path if config is not None else DEFAULT_PATH
    store = SQLiteStore(path, create=False)
    if not store.exists():
        raise CliError(f"no dead-letter store at {store.path} (nothing dead-lettered there yet?)")
    return store


async def _filter(
    args: argparse.Namespace, store: SQLiteStore | RabbitMQStore | NATSStore
) -> Filter:
    ids: list[str] = []
    for prefix in args.id:
        try:
            record = await store.get(prefix)
        except AmbiguousId as exc:
            raise CliError(f"{exc}: give more characters") from None
        if record is None:
            raise CliError(f"no dead letter with id {prefix!r} in {store.path}")
        ids.append(record.id)
    replayed = True if args.replayed else False if args.pending else None
    return Filter(
        ids=tuple(ids),
        reasons=tuple(args.reason),
        error_types=tuple(args.error_type),
        keys=tuple(args.key),
        since=None if args.since is None else parse_time(args.since),
        until=None if args.until is None else parse_time(args.until),
        replayed=replayed,
    )


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except (FileNotFoundError, StoreVersionError) as exc:
        raise CliError(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise CliError(f"cannot use the dead-letter store: {exc}") from None
    except Exception as exc:
        if not _is_broker_error(exc):
            raise
        raise CliError(f"cannot read the dead letters on the broker: {exc}") from None


def _is_broker_error(exc: BaseException) -> bool:
    """An error of the RabbitMQ or NATS client (an unreachable broker, a missing queue)."""
    module = type(exc).__module__
    return module.startswith(("aio_pika", "aiormq", "pamqp", "nats"))


# -- list ------------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    store = _store(args)

    async def go() -> list[DeadLetterRecord]:
        where = await _filter(args, store)
        return await store.find(where, limit=args.limit, newest_first=args.limit is not None)

    records: list[DeadLetterRecord] = _run(go())
    if args.limit is not None:
        records.reverse()
    if args.json:
        json.dump([r.to_dict() for r in records], sys.stdout, indent=2, default=repr)
        print()
        return 0
    if not records:
        print("No dead letters match.")
        return 0
    print(render_table(records))
    return 0


# -- show ------------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        record: DeadLetterRecord | None = _run(store.get(args.envelope_id))
    except AmbiguousId as exc:
        raise CliError(f"{exc}: give more characters") from None
    if record is None:
        raise CliError(f"no dead letter with id {args.envelope_id!r} in {store.path}")
    if args.json:
        json.dump(record.to_dict(), sys.stdout, indent=2, default=repr)
        print()
    else:
        print(render_record(record))
    return 0


# -- replay ----------------------------------------------------------------------------------------


class _ProgressBar:
    """A one-line progress bar on a text stream."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // total if total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\rreplaying [{bar}] {done}/{total}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        print(f"resilience: warning: {warning.message}", file=sys.stderr)


def _replay(args: argparse.Namespace) -> int:
    store = _store(args)
    show_bar = args.progress or (not args.no_progress and sys.stderr.isatty())
    bar = _ProgressBar(sys.stderr) if show_bar else None

    async def go() -> tuple[ReplayReport, str]:
        where = await _filter(args, store)
        backend: Any = None
        if not args.dry_run:
            from abe.backends.message_queue.loader import load_backend

            with _warnings_to_stderr():  # shown only when the backend is not refused
                try:
                    backend = load_backend()
                except (RuntimeError, ValueError) as exc:
                    raise CliError(str(exc)) from None
                _check_reachable(backend)
        try:
            report = await replay(
                store,
                backend,
                where=where,
                to_key=args.to_key,
                dry_run=args.dry_run,
                rate=args.rate,
                max_replays=args.max_replays,
                force=args.force,
                allow_redacted=args.allow_redacted,
                limit=args.limit,
                progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
            await _close(backend)
        return report, type(backend).__name__ if backend is not None else "-"

    report, backend_name = _run(go())
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(render_report(report, backend_name))
    return 0 if report.ok else 1


def _check_reachable(backend: Any) -> None:
    """Refuse to replay into an in-memory queue nobody else can read.

    Without ``QUEUE_BACKEND`` (and no third-party provider), ``load_backend()`` falls back to a
    ``MemoryBackend`` living in this command's process: the replayed messages would vanish when
    it exits, while their envelopes would be marked as replayed.
    """
    from abe.backends.message_queue.service.memory import MemoryBackend

    if not isinstance(backend, MemoryBackend):
        return
    if not os.environ.get("QUEUE_BACKEND", "").strip():
        raise CliError(
            "replay needs the broker your consumers read from: set QUEUE_BACKEND (for example "
            "QUEUE_BACKEND=redis); without it the replayed messages would go to an in-memory "
            "queue that disappears when this command exits (nothing was replayed or marked)"
        )
    print(
        "resilience: warning: QUEUE_BACKEND=memory: the replayed messages stay in this "
        "process's memory and are lost when it exits",
        file=sys.stderr,
    )


async def _close(backend: Any) -> None:
    closer = getattr(backend, "aclose", None) or getattr(backend, "close", None)
    if closer is None:
        return
    with contextlib.suppress(Exception):
        result = closer()
        if asyncio.iscoroutine(result):
            await result


# -- purge -----------------------------------------------------------------------------------------


def _purge(args: argparse.Namespace) -> int:
    store = _store(args)

    async def select() -> list[DeadLetterRecord]:
        return await store.find(await _filter(args, store))

    records: list[DeadLetterRecord] = _run(select())
    if not records:
        print("No dead letters match; nothing purged.")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(
                f"refusing to purge {len(records)} dead letter(s) without confirmation: pass --yes"
            )
        answer = input(f"Purge {len(records)} dead letter(s) from {store.path}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing purged.")
            return 1
    removed: int = _run(store.purge(Filter(ids=tuple(r.id for r in records))))
    print(f"Purged {removed} dead letter(s).")
    return 0
