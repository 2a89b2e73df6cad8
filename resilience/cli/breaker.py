"""``resilience breaker list|open|close|reset``: control the breakers of a running consumer.

Talks to the endpoint of ``resilience run --http HOST:PORT``; ``open`` is ``force_open()``,
``close`` is ``force_closed()`` and ``reset`` is ``reset()`` in that process.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from resilience.cli import CliError

_ACTIONS = ("open", "close", "reset")


def register(subparsers: Any) -> None:
    """Add the ``breaker`` sub-command."""
    parser = subparsers.add_parser(
        "breaker",
        help="list or force the circuit breakers of a running `resilience run --http`",
        description="Read or change the circuit breakers of a running consumer through its "
        "--http endpoint: open (force_open: nothing is processed until close or reset), "
        "close (force_closed: everything goes through, nothing trips), reset (closed, window "
        "emptied). Exit code 1 when the consumer has no breaker of that name.",
    )
    parser.add_argument("action", choices=("list", *_ACTIONS))
    parser.add_argument("name", nargs="?", help="the breaker's name (not for list)")
    parser.add_argument(
        "--http", required=True, metavar="HOST:PORT", help="the consumer's --http address"
    )
    parser.add_argument("--json", action="store_true", help="print the endpoint's JSON answer")
    parser.set_defaults(func=_main)


def _request(method: str, url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return int(exc.code), json.loads(exc.read())
        except ValueError:
            return int(exc.code), {"error": exc.reason}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the consumer at {url}: {reason}") from None


def _main(args: argparse.Namespace) -> int:
    base = args.http if "://" in args.http else f"http://{args.http}"
    base = base.rstrip("/")
    if args.action == "list":
        if args.name is not None:
            raise CliError("breaker list takes no name")
        status, data = _request("GET", f"{base}/breakers")
        rows = data.get("breakers", []) if status == 200 else []
    else:
        if not args.name:
            raise CliError(f"breaker {args.action} needs the breaker's name")
        quoted = urllib.parse.quote(args.name, safe="")
        status, data = _request("POST", f"{base}/breakers/{quoted}/{args.action}")
        rows = [data] if status == 200 else []
    if status != 200:
        print(f"resilience: error: {data.get('error', status)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for row in rows:
        print(
            f"{row['name']}: {row['state']} (calls {row['calls']}, failures {row['failures']}, "
            f"trips {row['trips']})"
        )
    if not rows:
        print("no circuit breakers")
    return 0
