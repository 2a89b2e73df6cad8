"""Size caps of dead-letter envelopes: bounded tracebacks and the whole-envelope cap."""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = ["bounded_traceback", "envelope_size", "fit"]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)


def envelope_size(envelope: Mapping[str, Any]) -> int:
    """Bytes of the envelope's compact UTF-8 JSON form."""
    return len(_dumps(envelope).encode("utf-8"))


def bounded_traceback(exc: BaseException, frames: int, max_bytes: int) -> tuple[str, bool]:
    """The formatted traceback of ``exc`` with at most ``frames`` innermost frames per exception
    and ``max_bytes`` bytes (its end kept); the flag says whether anything was cut."""
    cut = False
    if frames <= 0:
        text = "".join(traceback.format_exception_only(type(exc), exc))
        cut = exc.__traceback__ is not None
    else:
        if len(traceback.extract_tb(exc.__traceback__)) > frames:
            cut = True
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, -frames))
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        cut = True
        marker = f"[traceback truncated: {len(data) - max_bytes} bytes omitted]\n"
        tail = data[-(max_bytes - len(marker)) :].decode("utf-8", errors="ignore")
        text = marker + tail
    return text, cut


def fit(envelope: dict[str, Any], limit: int, keep_headers: tuple[str, ...]) -> dict[str, Any]:
    """Cut the envelope down to ``limit`` bytes, least useful parts first."""
    size = envelope_size(envelope)
    if size <= limit:
        return envelope
    error = envelope["error"]
    truncated: list[str] = envelope["truncated"]

    def mark(part: str) -> None:
        if part not in truncated:
            truncated.append(part)

    # 1. The traceback: keep its end (the frames nearest the failure and the exception line).
    tb: str = error["traceback"]
    keep = max(0, len(tb) - (size - limit) - 64)
    if tb:
        error["traceback"] = ("[traceback truncated]\n" + tb[-keep:]) if keep else ""
        mark("traceback")
        size = envelope_size(envelope)
    # 2. The exception message.
    if size > limit and len(error["message"]) > 256:
        error["message"] = error["message"][:256] + "... [truncated]"
        mark("message")
        size = envelope_size(envelope)
    # 3. Headers other than trace context and replay bookkeeping.
    if size > limit:
        envelope["headers"] = {k: v for k, v in envelope["headers"].items() if k in keep_headers}
        mark("headers")
        size = envelope_size(envelope)
    # 4. The body: replaced by a preview; such an envelope can no longer be replayed.
    for field in ("payload", "raw"):
        if size > limit and envelope[field] is not None:
            body = _dumps(envelope[field]).encode("utf-8")
            envelope[field] = None
            base = envelope_size(envelope)
            room = max(0, (limit - base - 64) // 2)  # escaping can double the preview's size
            envelope[f"{field}_preview"] = body[:room].decode("utf-8", errors="ignore")
            mark(field)
            size = envelope_size(envelope)
    # 5. The failure history (bounded by the number of distinct exception types).
    if size > limit and envelope["attempts"]["history"]:
        envelope["attempts"]["history"] = envelope["attempts"]["history"][-3:]
        mark("history")
        size = envelope_size(envelope)
    if size > limit:
        # Only pathological keys, ids or names are left: keep the bare minimum.
        minimal = {
            k: envelope[k] for k in ("schema", "id", "dead_lettered_at", "replay_count", "redacted")
        }
        minimal["payload"] = None
        minimal["headers"] = {}
        minimal["raw"] = None
        minimal["error"] = {
            "reason": error["reason"],
            "stage": error["stage"],
            "type": error["type"][:200],
            "cause_type": None,
            "message": "",
            "traceback": "",
        }
        minimal["source"] = {k: None for k in envelope["source"]}
        minimal["attempts"] = {**envelope["attempts"], "history": []}
        minimal["origin"] = {k: None for k in envelope["origin"]}
        minimal["trace"] = {"original": None, "processing": None}
        minimal["redacted"] = envelope["redacted"][:20]
        minimal["truncated"] = [*truncated, "envelope"]
        return minimal
    return envelope
