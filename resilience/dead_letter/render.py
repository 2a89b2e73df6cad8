"""Plain-text rendering of dead letters and replay reports (what ``resilience dlq`` prints)."""

from __future__ import annotations

import datetime as dt
import json

from .replay import ReplayReport
from .sinks import DeadLetterRecord

__all__ = ["format_time", "render_record", "render_report", "render_table"]


def format_time(seconds: float | None) -> str:
    """Wall-clock seconds as ``2026-01-31 12:00:00Z`` (UTC); ``-`` for ``None``."""
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def render_table(records: list[DeadLetterRecord]) -> str:
    """The ``dlq list`` table."""
    header = ("ID", "DEAD-LETTERED", "KEY", "REASON", "ERROR", "ATTEMPTS", "REPLAYS", "REPLAYED")
    rows = [header]
    for r in records:
        attempts = r.envelope.get("attempts") or {}
        rows.append(
            (
                r.id[:12],
                format_time(r.dead_lettered_at),
                _clip(r.key or "-", 24),
                r.reason,
                _clip(r.error_type.rsplit(".", 1)[-1], 28),
                f"{attempts.get('in_process', 0)}/{attempts.get('delivery_count', 0)}",
                str(r.replay_count),
                format_time(r.replayed_at) if r.replayed_at is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(f"{len(records)} dead letter(s); ATTEMPTS = in this process / broker deliveries")
    return "\n".join(line.rstrip() for line in lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_record(record: DeadLetterRecord) -> str:
    """The ``dlq show`` text."""
    env = record.envelope
    src = env.get("source") or {}
    err = env.get("error") or {}
    att = env.get("attempts") or {}
    origin = env.get("origin") or {}
    trace = env.get("trace") or {}
    history = ", ".join(
        f"{h['type']} x{h['count']} "
        f"(first {format_time(h['first'])}, last {format_time(h['last'])})"
        for h in att.get("history") or ()
    )
    original = (trace.get("original") or {}).get("traceparent") or "-"
    processing = (trace.get("processing") or {}).get("traceparent") or "-"
    cause = f" (cause: {err['cause_type']})" if err.get("cause_type") else ""
    lines = [
        f"id             {record.id}",
        f"schema         {env.get('schema')}",
        f"dead-lettered  {format_time(record.dead_lettered_at)}",
        f"source         {src.get('system') or '-'} key={src.get('key') or '-'} "
        f"group={src.get('group') or '-'} message_id={src.get('message_id') or '-'} "
        f"enqueued={format_time(src.get('enqueued_at'))}",
        f"reason         {err.get('reason')} (stage {err.get('stage')})",
        f"error          {err.get('type')}: {err.get('message')}{cause}",
        f"attempts       {att.get('in_process')} in process, broker delivery "
        f"{att.get('delivery_count')}" + (f"; {history}" if history else ""),
        f"origin         handler={origin.get('handler') or '-'} "
        f"service={origin.get('service') or '-'} host={origin.get('host') or '-'}",
        f"trace          original {original}; processing {processing}",
        f"replays        count {record.replay_count}; replayed from this store "
        f"{record.replays} time(s), last {format_time(record.replayed_at)} "
        f"to {record.replay_target or '-'}",
        f"redacted       {', '.join(env.get('redacted') or ()) or '-'}",
        f"truncated      {', '.join(env.get('truncated') or ()) or '-'}",
        "headers",
        _indent(json.dumps(env.get("headers") or {}, indent=2, ensure_ascii=False)),
        "payload",
    ]
    if env.get("payload") is not None:
        lines.append(_indent(json.dumps(env["payload"], indent=2, ensure_ascii=False)))
    elif env.get("raw"):
        lines.append(_indent(f"(undecodable, {env['raw']['encoding']}) {env['raw']['data']}"))
    else:
        preview = env.get("payload_preview") or env.get("raw_preview") or ""
        lines.append(_indent(f"(truncated) {preview}"))
    if err.get("traceback"):
        lines += ["traceback", _indent(str(err["traceback"]).rstrip())]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def render_report(report: ReplayReport, backend_name: str = "-") -> str:
    """The ``dlq replay`` summary."""
    lines: list[str] = []
    verb = "would replay" if report.dry_run else f"replayed (via {backend_name})"
    if report.dry_run:
        for record_id, key in report.replayed:
            lines.append(f"  {record_id[:12]} -> {key}")
    lines.insert(0, f"{report.selected} selected; {verb} {len(report.replayed)}")
    skipped = report.skipped_by_reason()
    if skipped:
        lines.append(
            "skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        )
        if "replay_limit" in skipped:
            lines.append("  (replay_limit: replayed too often already; raise --max-replays)")
        if "already_replayed" in skipped:
            lines.append("  (already_replayed: use --force to replay again)")
        if "redacted" in skipped:
            lines.append("  (redacted: fields are masked; --allow-redacted replays them masked)")
    for record_id, error in report.failed.items():
        lines.append(f"FAILED {record_id[:12]}: {error} (stopped; nothing after it was replayed)")
    if report.headers_dropped:
        lines.append(
            "warning: the backend cannot publish headers: replay counts and trace links were "
            "not carried"
        )
    return "\n".join(lines)
