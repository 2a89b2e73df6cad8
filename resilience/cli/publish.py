"""``resilience publish DEST JSON...``: put test messages on the configured backend.

The message goes through ``load_backend()``'s backend (``QUEUE_BACKEND`` picks it) with the
backend's own ``publish`` (``publish_message`` when headers are given), so what a consumer reads
is exactly what an application publishing through the same backend would have sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from resilience.cli import CliError

__all__ = ["parse_headers", "parse_payloads", "register"]


def register(subparsers: Any) -> None:
    """Add the ``publish`` sub-command."""
    parser = subparsers.add_parser(
        "publish",
        help="publish test messages to the configured backend",
        description="Publish one message per JSON object to DEST (a key, stream or queue) "
        "through load_backend()'s backend: QUEUE_BACKEND picks the provider and its own "
        "variables configure it (REDIS_URL for redis). Prints the message ids the broker "
        "returned.",
    )
    parser.add_argument("destination", metavar="DEST", help="key, stream or queue to publish to")
    parser.add_argument(
        "payloads",
        metavar="JSON",
        nargs="+",
        help="a JSON object per message; '-' reads one JSON object per line from stdin",
    )
    parser.add_argument(
        "--header",
        dest="headers",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="transport header for every message (repeatable; needs a backend that carries "
        "headers, such as memory or redis)",
    )
    parser.set_defaults(func=_main)


def parse_payloads(values: Sequence[str], stdin: Any = None) -> list[dict[str, Any]]:
    """The message payloads: each value is a JSON object, ``-`` reads JSON lines from stdin.

    Args:
        values: The command-line ``JSON`` arguments.
        stdin: Where ``-`` reads from (default ``sys.stdin``).

    Returns:
        One dict per message, in order.

    Raises:
        CliError: a value is not valid JSON or not a JSON object.
    """
    payloads: list[dict[str, Any]] = []
    for position, value in enumerate(values, start=1):
        if value == "-":
            lines = (stdin if stdin is not None else sys.stdin).read().splitlines()
            texts = [(f"stdin line {n}", line) for n, line in enumerate(lines, 1) if line.strip()]
        else:
            texts = [(f"JSON argument {position}", value)]
        for where, text in texts:
            try:
                payload = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CliError(f"{where} is not valid JSON ({exc}): {text!r}") from None
            if not isinstance(payload, dict):
                raise CliError(
                    f"{where} must be a JSON object such as '{{\"order\": 1}}', "
                    f"got {type(payload).__name__}: {text!r}"
                )
            payloads.append(payload)
    return payloads


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` strings as a header mapping.

    Raises:
        CliError: a value has no ``=`` or an empty name.
    """
    headers: dict[str, str] = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--header must look like NAME=VALUE, got {value!r}")
        headers[name.strip()] = text
    return headers


def _load_backend() -> Any:
    """``load_backend()``'s backend; refuses the in-memory fallback nobody else can read."""
    from abe.backends.message_queue.loader import load_backend
    from abe.backends.message_queue.service.memory import MemoryBackend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backend = load_backend()
        except (RuntimeError, ValueError) as exc:
            raise CliError(str(exc)) from None
    if isinstance(backend, MemoryBackend) and not os.environ.get("QUEUE_BACKEND", "").strip():
        raise CliError(
            "publish needs the broker your consumers read from: set QUEUE_BACKEND (for "
            "example QUEUE_BACKEND=redis); without it the message would go to an in-memory "
            "queue that disappears when this command exits (nothing was published)"
        )
    for warning in caught:
        print(f"resilience: warning: {warning.message}", file=sys.stderr)
    return backend


async def _publish(
    backend: Any, destination: str, payloads: list[dict[str, Any]], headers: dict[str, str]
) -> list[str | None]:
    from abe.backends.message_queue.base import HeaderPublishingBackend

    ids: list[str | None] = []
    try:
        with_headers = isinstance(backend, HeaderPublishingBackend)
        if headers and not with_headers:
            raise CliError(
                f"{type(backend).__name__} cannot carry headers; publish without --header"
            )
        for payload in payloads:
            if with_headers:
                # publish_message returns the broker's id; without headers it is plain publish.
                ids.append(
                    await backend.publish_message(destination, payload, headers=headers or None)
                )
            else:
                await backend.publish(destination, payload)
                ids.append(None)
    except CliError:
        raise
    except Exception as exc:
        done = f" after {len(ids)} of {len(payloads)} message(s)" if ids else ""
        raise CliError(
            f"publishing to {destination!r} failed{done}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        closer = getattr(backend, "aclose", None) or getattr(backend, "close", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
    return ids


def _main(args: argparse.Namespace) -> int:
    if not args.destination.strip():
        raise CliError("DEST must not be empty")
    payloads = parse_payloads(args.payloads)
    headers = parse_headers(args.headers)
    backend = _load_backend()
    ids = asyncio.run(_publish(backend, args.destination, payloads, headers))
    known = [i for i in ids if i]
    suffix = f": {', '.join(known)}" if known else ""
    print(
        f"published {len(ids)} message(s) to {args.destination!r} via "
        f"{type(backend).__name__}{suffix}"
    )
    return 0
