"""The chart's copies of shipped files, its dashboard, and its schema against the operator.

No helm needed: these read the files. tests/e2e/test_chart.py runs helm itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, Metric

from m2m_token_operator.app.handlers import _SHARD_NAME as SHARD_NAME
from m2m_token_operator.config.settings import Settings, SettingsError
from m2m_token_operator.kube.namespaces import SelectorError, validate_selector
from m2m_token_operator.reconcile import metrics
from m2m_token_operator.tokens.credentials import parse_host_entry

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "m2m-token-operator"


def test_the_chart_crds_are_the_shipped_crds() -> None:
    shipped = (REPO / "crds" / "tokenrequests.m2m.dev.yaml").read_bytes()
    assert (CHART / "crds" / "tokenrequests.m2m.dev.yaml").read_bytes() == shipped
    # Kopf's peering CRDs, as manifests/kopf-peering.yaml ships them.
    kopf = (REPO / "manifests" / "kopf-peering.yaml").read_bytes()
    assert (CHART / "crds" / "kopf-peering.yaml").read_bytes() == kopf
    # Nothing else: crds/ of the chart is CRDs only (helm applies them verbatim).
    kinds = {
        doc["kind"]
        for path in (CHART / "crds").iterdir()
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    }
    assert kinds == {"CustomResourceDefinition"}
    crd_files = {path.name for path in (REPO / "crds").glob("*.yaml")} - {"kustomization.yaml"}
    assert crd_files <= {path.name for path in (CHART / "crds").iterdir()}


def test_the_chart_alerts_are_docs_alerts() -> None:
    assert (CHART / "files" / "alerts.yaml").read_bytes() == (
        REPO / "docs" / "alerts.yaml"
    ).read_bytes()


def test_the_dashboard_in_docs_is_the_charts() -> None:
    assert (CHART / "dashboards" / "m2m-token-operator.json").read_bytes() == (
        REPO / "docs" / "grafana-dashboard.json"
    ).read_bytes()


def _exported_series() -> set[str]:
    """The series names the operator's registry exposes (with _total, _bucket, ... suffixes).

    Read from the registry rather than a list of collectors, so that a metric renamed
    or removed in metrics.py (as the per-TokenRequest ones were) fails here.
    """
    names: set[str] = set()
    collected: list[Metric] = list(REGISTRY.collect())
    for family in collected:
        if not family.name.startswith("m2m_"):
            continue
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(
        (CHART / "dashboards" / "m2m-token-operator.json").read_text()
    )
    return dashboard


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = _dashboard()["panels"]
    return panels


def _metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\bm2m_[a-z_]+\b", expression))


def test_the_registry_lists_the_per_namespace_series() -> None:
    # Without this, an empty or partial registry would let the tests below pass.
    exported = _exported_series()
    assert {
        metrics.SOONEST_EXPIRY,
        metrics.TOKEN_REQUESTS,
        metrics.NOT_READY,
        "m2m_token_refresh_failures_total",
        "m2m_refresh_lag_seconds_bucket",
    } <= exported


def test_every_dashboard_query_names_metrics_the_operator_exports() -> None:
    exported = _exported_series()
    queried: set[str] = set()
    for panel in _panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= exported, f"{panel['title']}: not exported: {names - exported}"
            queried |= names
    # What an operator of the service looks at (issue #19), each in some panel.
    for wanted in (
        metrics.NOT_READY,
        metrics.TOKEN_REQUESTS,
        metrics.SOONEST_EXPIRY,
        "m2m_token_endpoint_requests_total",
        "m2m_token_refresh_failures_total",
        "m2m_refresh_lag_seconds_bucket",
        "m2m_kube_api_request_duration_seconds_bucket",
        "m2m_look_slot_wait_seconds_bucket",
    ):
        assert wanted in queried


def test_the_dashboard_variables_query_exported_metrics() -> None:
    exported = _exported_series()
    variables = [v for v in _dashboard()["templating"]["list"] if v["type"] == "query"]
    assert variables
    for variable in variables:
        for query in (variable["query"]["query"], variable["definition"]):
            names = _metric_names(query)
            assert names, query
            assert names <= exported, f"{variable['name']}: not exported: {names - exported}"


def test_every_alert_names_metrics_the_operator_exports() -> None:
    exported = _exported_series()
    [rule] = [doc for doc in yaml.safe_load_all((REPO / "docs" / "alerts.yaml").read_text()) if doc]
    alerted: set[str] = set()
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            names = _metric_names(alert["expr"])
            assert names <= exported, f"{alert['alert']}: not exported: {names - exported}"
            alerted |= names
    assert {metrics.SOONEST_EXPIRY, metrics.NOT_READY} <= alerted


def test_dashboard_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine


# --- the schema accepts what the operator accepts ----------------------------------------

SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _pattern(*path: str) -> re.Pattern[str]:
    node = SCHEMA
    for key in path:
        node = node["properties"][key] if key != "items" else node["items"]
    return re.compile(node["pattern"])


SELECTORS = [
    "m2m.dev/operator-identity=allowed",
    "team",
    "!team",
    "team==a",
    "team!=a",
    "team=",
    "env in (prod, staging)",
    "env notin (dev)",
    "tier>1",
    "kubernetes.io/metadata.name",
    "a=b, c in (d,e), !f",
    "a=b=c",
    "env in prod",
    "team=a b",
    "=a",
    "Team_/x",
    "team in ()x",
    "a,,b",
    "x/y/z",
    "tier>a",
    "example.com/" + "k" * 64,
]


@pytest.mark.parametrize("selector", SELECTORS)
def test_the_selector_pattern_agrees_with_the_operator(selector: str) -> None:
    try:
        validate_selector(selector)
        operator_accepts = True
    except SelectorError:
        operator_accepts = False
    pattern = _pattern("operatorIdentity", "namespaceSelector")
    assert bool(pattern.fullmatch(selector)) == operator_accepts


HOSTS = [
    "login.microsoftonline.com",
    "*.example.com",
    "idp.example.com:8443",
    "127.0.0.1:8080",
    "Login.Example.COM",
    "example.com.",
    "https://login.microsoftonline.com",
    "login.*.com",
    "*.",
    "user@host",
    "host/path",
]


@pytest.mark.parametrize("host", HOSTS)
def test_the_host_pattern_agrees_with_the_operator(host: str) -> None:
    try:
        parse_host_entry(host)
        operator_accepts = True
    except ValueError:
        operator_accepts = False
    pattern = _pattern("allowedTokenEndpointHosts", "items")
    assert bool(pattern.fullmatch(host)) == operator_accepts


@pytest.mark.parametrize("name", ["prod-gcp", "a", "x" * 63, "Prod", "prod_gcp", "-prod", "x" * 64])
def test_the_cluster_name_pattern_agrees_with_the_operator(name: str) -> None:
    try:
        Settings.from_env({"M2M_CLUSTER_NAME": name})
        operator_accepts = True
    except SettingsError:
        operator_accepts = False
    node = SCHEMA["properties"]["clusterName"]
    schema_accepts = bool(re.fullmatch(node["pattern"], name)) and len(name) <= node["maxLength"]
    assert schema_accepts == operator_accepts


@pytest.mark.parametrize(
    "name", ["team-a", "a", "0", "x" * 40, "x" * 41, "Team-a", "team_a", "-team", "team-", ""]
)
def test_the_shard_name_pattern_agrees_with_the_operator(name: str) -> None:
    """sharding.name becomes M2M_SHARD, which the operator checks at start."""
    operator_accepts = bool(SHARD_NAME.fullmatch(name))
    node = SCHEMA["properties"]["sharding"]["properties"]["name"]
    required = SCHEMA["properties"]["sharding"]["then"]["properties"]["name"]
    schema_accepts = (
        bool(re.fullmatch(node["pattern"], name))
        and len(name) <= node["maxLength"]
        and len(name) >= required["minLength"]
    )
    assert schema_accepts == operator_accepts


def test_every_value_has_a_schema_and_a_comment() -> None:
    values_text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    assert set(values) <= set(SCHEMA["properties"])
    for key in values:
        # Each top-level key is introduced by a comment (on it or on the line before).
        before = values_text.split(f"\n{key}:", 1)[0]
        assert before.rstrip().splitlines()[-1].lstrip().startswith("#"), key


def test_every_kustomization_labels_its_objects_with_the_charts_version() -> None:
    """The base and the kustomizations outside it (whose objects the base's labels do
    not reach) carry the same labels, and the version is the chart's appVersion."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    expected = {
        "app.kubernetes.io/part-of": "m2m-token-operator",
        "app.kubernetes.io/version": chart["appVersion"],
    }
    for path in (
        REPO / "manifests" / "kustomization.yaml",
        REPO / "manifests" / "components" / "namespaced" / "kustomization.yaml",
        REPO
        / "manifests"
        / "components"
        / "namespaced"
        / "served-namespace"
        / "kustomization.yaml",
    ):
        kustomization = yaml.safe_load(path.read_text())
        assert [entry["pairs"] for entry in kustomization["labels"]] == [expected], path
