"""Every PromQL expression we ship parses with Prometheus's own parser.

The Grafana dashboard (`docs/grafana-dashboard.json`, the chart's copy) and the
alert rules (`docs/alerts.yaml`, the chart's PrometheusRule) are checked by
`promql-check`, Prometheus's `promql/parser` built by devenv like the other
tools: a typo in a query fails here, not as an empty panel or a rule that
Prometheus refuses to load. tests/unit/test_chart_files.py checks that the
queries name metrics the operator exports.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devenv.binaries import ensure_promql_check
from devenv.install import REPO_ROOT, read_documents


def check(expressions: list[str]) -> list[dict[str, Any]]:
    answer = subprocess.run(
        [str(ensure_promql_check())],
        input="".join(json.dumps(expr) + "\n" for expr in expressions),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    results: list[dict[str, Any]] = [json.loads(line) for line in answer.stdout.splitlines()]
    assert len(results) == len(expressions)
    return results


def dashboard_expressions(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_expressions() -> list[str]:
    [rule] = read_documents(REPO_ROOT / "docs" / "alerts.yaml")
    return [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]


@pytest.mark.parametrize(
    "source",
    ["docs/grafana-dashboard.json", "charts/m2m-token-operator/dashboards/m2m-token-operator.json"],
)
def test_every_dashboard_query_parses(source: str) -> None:
    expressions = dashboard_expressions(REPO_ROOT / source)
    assert expressions
    failures = [
        f"{expr}: {result['error']}"
        for expr, result in zip(expressions, check(expressions), strict=True)
        if not result["ok"]
    ]
    assert failures == []


def test_every_alert_expression_parses() -> None:
    expressions = alert_expressions()
    assert len(expressions) >= 5
    assert all(result["ok"] for result in check(expressions)), check(expressions)


def test_the_checker_rejects_what_prometheus_rejects() -> None:
    # Without this, a checker that accepted everything would pass the tests above.
    good, unbalanced, bad_grouping = check(
        [
            'sum by (le) (rate(m2m_refresh_lag_seconds_bucket{namespace=~"$namespace"}[5m]))',
            "sum(rate(m2m_token_endpoint_requests_total[5m])",
            "sum by (le (rate(m2m_refresh_lag_seconds_bucket[5m]))",
        ]
    )
    assert good == {"ok": True}
    assert unbalanced["ok"] is False
    assert "parse error" in unbalanced["error"]
    assert bad_grouping["ok"] is False
