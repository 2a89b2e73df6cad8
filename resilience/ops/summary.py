"""The policy in one short line, for the startup line and reload messages."""

from __future__ import annotations

from typing import Any

__all__ = ["policy_summary"]


def policy_summary(policy: Any) -> str:
    """The policy in one short line: ``retry(attempts=3 ...) timeout(attempt=30 total=0)``.

    Args:
        policy: A :class:`~resilience.policy.Policy` (``None``: the handler's own policy).

    Returns:
        One line; nested tables are left out.
    """
    if policy is None:
        return "the handler's @resilient policy"
    parts: list[str] = []
    for section, values in policy.to_dict().items():
        if not isinstance(values, dict):
            parts.append(f"{section}={_short(values)}")
            continue
        inner = " ".join(
            f"{key}={_short(value)}" for key, value in values.items() if not isinstance(value, dict)
        )
        parts.append(f"{section}({inner})")
    return " ".join(parts) or "none"


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)
