"""Size caps of dead-letter envelopes: bounded tracebacks and the whole-envelope cap."""

from __future__ import annotations

import json
import linecache
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any

__all__ = ["bounded_traceback", "dumps", "envelope_size", "fit", "fit_encoded"]

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=repr)


def dumps(value: Any) -> str:
    """The compact JSON form envelopes are measured and stored in."""
    return _ENCODER.encode(value)


_dumps = dumps


def _size(text: str) -> int:
    """Bytes of ``text`` in UTF-8."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def envelope_size(envelope: Mapping[str, Any]) -> int:
    """Bytes of the envelope's compact UTF-8 JSON form."""
    return _size(dumps(envelope))


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
_REPEAT_CUTOFF = 3  # as in the traceback module: identical frames beyond this are folded


def bounded_traceback(
    exc: BaseException,
    frames: int,
    max_bytes: int,
    *,
    scrub: Callable[[str], str] | None = None,
) -> tuple[str, bool]:
    """The formatted traceback of ``exc`` with at most ``frames`` innermost frames per exception
    and ``max_bytes`` bytes (its end kept); the flag says whether anything was cut. ``scrub``
    (masking secrets) is applied before the byte cap.

    The text is what :func:`traceback.format_exception` prints (the cause / context chain, the
    source line of every frame, folded recursion, notes) without the ``^^^^`` position markers.
    Frames beyond the limit are dropped *before* any source line is looked up, and the markers,
    which need each frame's line re-parsed, are never computed: that keeps one envelope in the
    tens of microseconds instead of about half a millisecond.
    """
    cut = False
    if frames <= 0:
        text = _exception_only(exc)
        cut = exc.__traceback__ is not None
    elif _has_group(exc):
        # Exception groups draw nested boxes; leave those to the traceback module.
        if _frame_count(exc.__traceback__) > frames:
            cut = True
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, -frames))
    else:
        text, cut = _format_chain(exc, frames)
    if scrub is not None:
        text = scrub(text)
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        cut = True
        marker = f"[traceback truncated: {len(data) - max_bytes} bytes omitted]\n"
        tail = data[-(max_bytes - len(marker)) :].decode("utf-8", errors="ignore")
        text = marker + tail
    return text, cut


def _frame_count(tb: TracebackType | None) -> int:
    count = 0
    while tb is not None:
        count += 1
        tb = tb.tb_next
    return count


def _has_group(exc: BaseException) -> bool:
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BaseExceptionGroup):
            return True
        if e.__cause__ is not None:
            pending.append(e.__cause__)
        if e.__context__ is not None:
            pending.append(e.__context__)
    return False


def _format_chain(exc: BaseException, frames: int) -> tuple[str, bool]:
    # Oldest first, as Python prints it: follow __cause__, else an unsuppressed __context__.
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    link = ""
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    cut = False
    for e, link in reversed(chain):
        tb = e.__traceback__
        if tb is not None:
            kept: list[TracebackType] = []
            while tb is not None:
                kept.append(tb)
                tb = tb.tb_next
            if len(kept) > frames:
                cut = True
                kept = kept[-frames:]
            parts.append("Traceback (most recent call last):\n")
            parts.extend(_format_frames(kept))
        parts.append(_exception_only(e))
        parts.append(link)
    return "".join(parts), cut


_FRAME_CACHE_LIMIT = 4096
_frame_lines: dict[tuple[str, int | None, str], str] = {}
"""Formatted frames (``File ...`` line and source line) by location, read once each."""


def _frame_text(frame: FrameType, where: tuple[str, int | None, str]) -> str:
    """The two lines of one frame, from the cache or formatted (and cached) now."""
    text = _frame_lines.get(where)
    if text is None:
        filename, lineno, name = where
        linecache.lazycache(filename, frame.f_globals)
        linecache.checkcache(filename)
        line = linecache.getline(filename, lineno).strip() if lineno is not None else ""
        text = f'  File "{filename}", line {lineno}, in {name}\n'
        if line:
            text += f"    {line}\n"
        if len(_frame_lines) >= _FRAME_CACHE_LIMIT:
            _frame_lines.clear()
        _frame_lines[where] = text
    return text


def _format_frames(tbs: list[TracebackType]) -> list[str]:
    # A location's source line is looked up once per process (later edits of the file are not
    # seen), so a dead letter costs no file checks.
    out: list[str] = []
    last: tuple[str, int | None, str] | None = None
    count = 0
    for tb in tbs:
        frame = tb.tb_frame
        code = frame.f_code
        where = (code.co_filename, tb.tb_lineno, code.co_name)
        if where != last:
            if count > _REPEAT_CUTOFF:
                out.append(_repeated(count - _REPEAT_CUTOFF))
            last = where
            count = 0
        count += 1
        if count > _REPEAT_CUTOFF:
            continue
        out.append(_frame_text(frame, where))
    if count > _REPEAT_CUTOFF:
        out.append(_repeated(count - _REPEAT_CUTOFF))
    return out


def _repeated(count: int) -> str:
    return f"  [Previous line repeated {count} more time{'s' if count > 1 else ''}]\n"


def _safe_str(value: object, what: str) -> str:
    try:
        return str(value)
    except Exception:
        return f"<{what} str() failed>"


def _exception_only(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc))
    cls = type(exc)
    name = cls.__qualname__
    module = cls.__module__
    if module not in ("__main__", "builtins"):
        name = f"{module if isinstance(module, str) else '<unknown>'}.{name}"
    text = _safe_str(exc, "exception")
    lines = [f"{name}: {text}\n" if text else f"{name}\n"]
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, Sequence) and not isinstance(notes, str | bytes):
        for note in notes:
            lines.extend(line + "\n" for line in _safe_str(note, "note").split("\n"))
    elif notes is not None:
        try:
            lines.append(repr(notes))
        except Exception:
            lines.append("<__notes__ repr() failed>")
    return "".join(lines)


def fit(envelope: dict[str, Any], limit: int, keep_headers: tuple[str, ...]) -> dict[str, Any]:
    """Cut the envelope down to ``limit`` bytes, least useful parts first."""
    return fit_encoded(envelope, limit, keep_headers)[0]


def fit_encoded(
    envelope: dict[str, Any], limit: int, keep_headers: tuple[str, ...]
) -> tuple[dict[str, Any], str]:
    """:func:`fit`, and the JSON text (:func:`dumps`) of the envelope it returns."""
    text = dumps(envelope)
    if _size(text) <= limit:
        return envelope, text
    envelope = _cut(envelope, _size(text), limit, keep_headers)
    return envelope, dumps(envelope)


def _cut(
    envelope: dict[str, Any], size: int, limit: int, keep_headers: tuple[str, ...]
) -> dict[str, Any]:
    error = envelope["error"]
    truncated: list[str] = envelope["truncated"]

    def mark(part: str) -> None:
        if part not in truncated:
            truncated.append(part)

    # 0. The failed writes listed one by one, all alike (their count and times stay).
    writes = envelope.get("write_failures")
    if writes and len(writes["recent"]) > 1:
        writes["recent"] = writes["recent"][-1:]
        mark("write_failures")
        size = envelope_size(envelope)
    # 1. The traceback: keep its end (the frames nearest the failure and the exception line).
    tb: str = error["traceback"]
    keep = max(0, len(tb) - (size - limit) - 64)
    if tb and size > limit:
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
        if writes:
            minimal["write_failures"] = {**writes, "recent": []}
        minimal["redacted"] = envelope["redacted"][:20]
        minimal["truncated"] = [*truncated, "envelope"]
        return minimal
    return envelope
