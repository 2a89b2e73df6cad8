"""The Grafana dashboard under docs/ queries only metrics the endpoint exports and the docs list."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "resilience-dashboard.json"
FUNCTIONS = {"sum", "rate", "max", "min", "by", "histogram_quantile", "le", "job", "instance"}


def test_dashboard_queries_use_documented_metric_names() -> None:
    """Every metric a panel queries is in docs/operations.md's table, and the panels cover
    throughput, outcomes, retries, dead letters, breaker state, percentiles and in-flight."""
    dashboard = json.loads(DASHBOARD.read_text())
    docs = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", docs, flags=re.MULTILINE))
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = re.findall(r"\b([a-z][a-z_]+)\s*[{\[(]", target["expr"])
            queried.update(n for n in names if n not in FUNCTIONS)
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in queried}
    assert families <= documented, families - documented
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "throughput",
        "outcome",
        "retries",
        "dead letters",
        "breaker",
        "percentiles",
        "in flight",
    ):
        assert topic in titles
