"""kubectl m2m: rendering, the doctor's diagnosis and the error messages, without a cluster."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from m2m_token_operator.cli.kubectl_plugin import (
    NO_ROLES_HINT,
    PluginError,
    api_failure,
    build_parser,
    clean,
    diagnose,
    refresh_patch,
    relative,
    render_claims,
    render_doctor,
    render_status,
    token_request_secrets,
)

NOW = datetime(2026, 11, 29, 9, 13, 0, tzinfo=UTC)
CLAIMS = {
    "audience": "api://prod-gcp.orders.orders-api",
    "clientId": "client-1",
    "tenantId": "tenant-1",
    "roles": ["access_as_application"],
    "issuedAt": "2026-11-29T09:00:00Z",
    "expiresAt": "2026-11-29T10:00:00Z",
}


def token_request(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": "orders-api", "generation": 1, "uid": "u1"},
        "spec": {"target": {"application": "orders-api"}},
        "status": {
            "observedGeneration": 1,
            "scope": "api://prod-gcp.shop.orders-api/.default",
            "secretName": "orders-api",
            "expiresAt": "2026-11-29T10:00:00Z",
            "refreshAt": "2026-11-29T09:40:00Z",
            "failedAttempts": 0,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "TokenIssued", "message": "ok"},
                {"type": "Degraded", "status": "False", "reason": "RefreshSucceeded",
                 "message": "The last token request succeeded"},
            ],
            "token": CLAIMS,
            **status,
        },
    }  # fmt: skip


def event(reason: str, minute: int, kind: str = "Normal", message: str = "m") -> dict[str, Any]:
    return {
        "type": kind,
        "reason": reason,
        "message": message,
        "lastTimestamp": f"2026-11-29T09:{minute:02d}:00Z",
        "involvedObject": {"uid": "u1"},
    }


# --- status --------------------------------------------------------------------------


def test_status_is_one_screen_with_everything() -> None:
    text = render_status(
        token_request(),
        [event("TokenRefreshed", 5), event("TokenIssued", 1)],
        now=NOW,
    )
    assert text.startswith("TokenRequest shop/orders-api\n")
    assert "Ready:                True (TokenIssued) ok" in text
    assert "Degraded:             False (RefreshSucceeded)" in text
    assert "Expires:              2026-11-29T10:00:00Z (in 47m)" in text
    assert "Refresh at:           2026-11-29T09:40:00Z (in 27m)" in text
    assert "Roles:                access_as_application" in text
    assert "Client ID:            client-1" in text
    # Events in time order, the most recent last.
    assert text.index("TokenIssued: m") < text.index("TokenRefreshed: m")
    assert "12m ago" in text
    assert len(text.splitlines()) <= 30


def test_status_without_roles_says_why_calls_fail() -> None:
    text = render_status(token_request(token={**CLAIMS, "roles": []}), [], now=NOW)
    assert NO_ROLES_HINT in text
    assert "Events (most recent last):\n  - (none)" in text


def test_status_before_the_operator_reported() -> None:
    body = token_request()
    body["status"] = {}
    text = render_status(body, None, now=NOW, events_error="you may not list events")
    assert "Ready:                - (the operator has not reported yet)" in text
    assert "(no token yet, or the token is not a JWT)" in text
    assert "(you may not list events)" in text


def test_status_shows_failures_refresh_requests_and_unhandled_generations() -> None:
    body = token_request(
        failedAttempts=3,
        lastFailureTime="2026-11-29T09:12:00Z",
        lastRefreshRequest="2026-11-29T09:00:00Z",
        observedGeneration=1,
    )
    body["metadata"]["generation"] = 2
    body["metadata"]["annotations"] = {"m2m.dev/refresh": "2026-11-29T09:10:00Z"}
    text = render_status(body, [], now=NOW)
    assert "Failed attempts:      3, last 2026-11-29T09:12:00Z (60s ago)" in text
    assert "Refresh requested:    2026-11-29T09:10:00Z" in text
    assert "Last handled:         2026-11-29T09:00:00Z" in text
    assert "not handled yet" in text


def test_hostile_status_cannot_send_terminal_escapes_or_flood() -> None:
    body = token_request(scope="\x1b]0;pwned\x07" + "x" * 10_000)
    text = render_status(body, [event("R\x1b[2J", 1, message="a\nb")], now=NOW)
    assert "\x1b" not in text
    assert "\x07" not in text
    assert max(len(line) for line in text.splitlines()) < 500
    assert clean("a\nb") == "a?b"


def test_only_the_most_recent_events_are_shown() -> None:
    events = [event(f"Reason{i}", i) for i in range(20)]
    text = render_status(token_request(), events, now=NOW)
    assert "Reason19" in text
    assert "Reason11:" not in text


@pytest.mark.parametrize(
    ("delta", "expected"),
    [(47 * 60, "in 47m"), (-30, "30s ago"), (3 * 3600 + 60, "in 3h1m"), (-5 * 86400, "5d ago")],
)
def test_relative_times(delta: int, expected: str) -> None:
    assert relative(NOW + timedelta(seconds=delta), NOW) == expected


# --- claims and refresh --------------------------------------------------------------


def test_claims_as_yaml_and_json() -> None:
    body = token_request()
    assert yaml.safe_load(render_claims(body, "yaml")) == CLAIMS
    assert json.loads(render_claims(body, "json")) == CLAIMS


def test_refresh_patch_sets_the_annotation_to_now() -> None:
    assert refresh_patch(NOW) == {
        "metadata": {"annotations": {"m2m.dev/refresh": "2026-11-29T09:13:00Z"}}
    }


# --- doctor --------------------------------------------------------------------------


def pod(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"containers": [], **spec}}


TOKEN_REQUESTS = [
    {"metadata": {"name": "orders-api"}, "spec": {"secretName": "orders-token"},
     "status": {"secretName": "orders-token"}},
    {"metadata": {"name": "billing-api"}, "spec": {}},  # Secret defaults to the name
]  # fmt: skip


def test_secrets_of_token_requests() -> None:
    assert token_request_secrets(TOKEN_REQUESTS) == {
        "orders-token": "orders-api",
        "billing-api": "billing-api",
    }


def test_doctor_finds_env_envfrom_subpath_and_projected_subpath() -> None:
    pods = [
        pod("env", containers=[{"name": "app", "env": [
            {"name": "TOKEN",
             "valueFrom": {"secretKeyRef": {"name": "orders-token", "key": "token"}}},
            {"name": "OTHER", "valueFrom": {"secretKeyRef": {"name": "unrelated", "key": "x"}}},
            {"name": "PLAIN", "value": "v"},
        ]}]),
        pod("envfrom", initContainers=[{"name": "setup", "envFrom": [
            {"secretRef": {"name": "billing-api"}}, {"configMapRef": {"name": "billing-api"}},
        ]}]),
        pod("subpath",
            volumes=[{"name": "tok", "secret": {"secretName": "orders-token"}}],
            containers=[{"name": "app", "volumeMounts": [
                {"name": "tok", "mountPath": "/var/run/token", "subPath": "token"}]}]),
        pod("projected",
            volumes=[{"name": "all", "projected": {"sources": [
                {"configMap": {"name": "cm"}}, {"secret": {"name": "billing-api"}}]}}],
            containers=[{"name": "app", "volumeMounts": [
                {"name": "all", "mountPath": "/etc/app/token", "subPathExpr": "$(X)"}]}]),
        pod("good",
            volumes=[{"name": "tok", "secret": {"secretName": "orders-token"}}],
            containers=[{"name": "app", "volumeMounts": [{"name": "tok", "mountPath": "/t"}]}]),
    ]  # fmt: skip
    findings = diagnose(pods, TOKEN_REQUESTS)
    found = {(f.pod, f.container, f.secret, f.token_request) for f in findings}
    assert found == {
        ("env", "app", "orders-token", "orders-api"),
        ("envfrom", "init:setup", "billing-api", "billing-api"),
        ("subpath", "app", "orders-token", "orders-api"),
        ("projected", "app", "billing-api", "billing-api"),
    }
    by_pod = {f.pod: f for f in findings}
    assert by_pod["env"].how == "env TOKEN from key token"
    assert "mount the Secret as a volume" in by_pod["env"].fix
    assert "subPath token" in by_pod["subpath"].how
    assert "/var/run/m2m" in by_pod["subpath"].fix
    text = render_doctor("shop", findings, token_requests=2)
    assert text.startswith("4 way(s) in namespace shop that never see a refreshed token:")
    assert text.count("    fix: ") == 4


def test_doctor_with_nothing_to_say() -> None:
    assert "every consumer sees refreshed tokens" in render_doctor("shop", [], token_requests=1)
    assert render_doctor("shop", [], token_requests=0) == "No TokenRequests in namespace shop.\n"


# --- command line and errors ---------------------------------------------------------


def test_parser_takes_kubectl_style_flags_after_the_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["status", "orders-api", "-n", "shop", "--context", "prod"])
    assert (args.command, args.name, args.namespace, args.context) == (
        "status",
        "orders-api",
        "shop",
        "prod",
    )
    assert parser.parse_args(["claims", "x", "-o", "json"]).output == "json"
    assert parser.parse_args(["doctor", "shop"]).target_namespace == "shop"
    assert parser.parse_args(["doctor"]).target_namespace is None
    with pytest.raises(SystemExit):
        parser.parse_args(["claims", "x", "-o", "table"])


def api_exception(status: int, message: str = "") -> SimpleNamespace:
    return SimpleNamespace(status=status, reason="Reason", body=json.dumps({"message": message}))


def test_forbidden_is_exit_2_and_says_what_was_not_allowed() -> None:
    error = api_failure(
        api_exception(403, 'pods is forbidden: User "dev" cannot list resource "pods"'),
        action="list pods",
        namespace="shop",
    )
    assert isinstance(error, PluginError)
    assert error.code == 2
    assert str(error).startswith("you may not list pods in namespace shop: pods is forbidden")


def test_not_found_is_exit_1() -> None:
    error = api_failure(
        api_exception(404), action="get", namespace="shop", what="TokenRequest orders-api"
    )
    assert (error.code, str(error)) == (1, "TokenRequest orders-api not found in namespace shop")
    assert api_failure(api_exception(401), action="get", namespace="x").code == 2
    assert api_failure(api_exception(500, "boom"), action="get", namespace="x").code == 1
