"""Day-two features with the real operator and the real token server (issue 13).

status.token and NoAppRoles come from the status functions alone; force refresh
and spec.secretTemplate need the reconciler's wiring, and are skipped until
`TokenRequestReconciler.refresh_requested` exists.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from devenv.operatorprocess import OperatorProcess
from devenv.tokenserver import NO_ROLES_ISSUER, ROLE, TENANT_ID, jwt_claims
from m2m_token_operator.reconcile.reconciler import TokenRequestReconciler

from ._support import (
    CLUSTER_NAME,
    GROUP,
    OPERATOR_CLIENT_ID,
    PLURAL,
    VERSION,
    Kube,
    OperatorFactory,
    token_request,
    wait_for,
)

ORDERS = {"application": "orders-api", "namespace": "orders"}
ORDERS_SCOPE = f"api://{CLUSTER_NAME}.orders.orders-api/.default"

needs_wiring = pytest.mark.skipif(
    not hasattr(TokenRequestReconciler, "refresh_requested"),
    reason="issue 13's reconciler wiring (refresh_requested, secretTemplate) is not merged yet",
)


def _utc(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _requests_for(operator: OperatorProcess, scope: str) -> int:
    """How often the operator asked the token endpoint for `scope` (its debug log says so)."""
    return operator.log_text().count(f"requesting a token for scope {scope} ")


def _reasons(kube: Kube, namespace: str, name: str) -> list[str]:
    return [
        str(e.reason)
        for e in kube.events([namespace])
        if e.involved_object is not None and e.involved_object.name == name
    ]


def test_status_token_tells_what_the_real_token_says(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    body = kube.wait_ready(namespace, "orders-api", operator=operator)
    secret = kube.wait_secret(namespace, "orders-api", operator=operator)
    claims = jwt_claims(secret.token)

    assert body["status"]["token"] == {
        "audience": ORDERS_SCOPE,  # mock-oauth2-server puts the scope in aud
        "clientId": OPERATOR_CLIENT_ID,
        "tenantId": TENANT_ID,
        "roles": [ROLE],
        "issuedAt": _utc(claims["iat"]),
        "expiresAt": _utc(claims["exp"]),
    }
    text = json.dumps(body)
    for part in secret.token.split("."):
        assert part not in text  # neither the token, nor its header or signature
    # A NoAppRoles warning would be posted with TokenIssued, after the status: wait for that.
    kube.wait_events([namespace], {"TokenIssued": 1}, operator=operator)
    assert "NoAppRoles" not in _reasons(kube, namespace, "orders-api")


def test_a_token_without_roles_is_warned_about_once(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    operator = start_operator(issuer=NO_ROLES_ISSUER)
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    body = kube.wait_ready(namespace, "orders-api", operator=operator)
    assert body["status"]["token"]["roles"] == []

    def warned() -> list[Any] | None:
        found = [
            e for e in kube.events([namespace]) if e.reason == "NoAppRoles" and e.type == "Warning"
        ]
        return found or None

    [event] = wait_for(warned, timeout=30, what="a NoAppRoles event", operator=operator)
    assert event.message == (
        "The token has no roles claim: the target application has not granted this client an"
        f" app role; calls will likely get 403; ask the owners of {ORDERS_SCOPE} to assign an"
        f" app role to client {OPERATOR_CLIENT_ID}"
    )
    # The same token identity again (the Secret restored with the same token): no repeat.
    kube.core.delete_namespaced_secret("orders-api", namespace)
    wait_for(
        lambda: "SecretRestored" in _reasons(kube, namespace, "orders-api"),
        timeout=30,
        what="SecretRestored",
        operator=operator,
    )
    assert _reasons(kube, namespace, "orders-api").count("NoAppRoles") == 1


def _annotate(kube: Kube, namespace: str, name: str, value: str) -> None:
    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"metadata": {"annotations": {"m2m.dev/refresh": value}}},
    )


def _handled(kube: Kube, namespace: str, name: str, value: str) -> dict[str, Any] | None:
    body = kube.get_token_request(namespace, name)
    if body is not None and (body.get("status") or {}).get("lastRefreshRequest") == value:
        return body
    return None


@needs_wiring
def test_force_refresh_fetches_once_for_every_token_request_on_the_key(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    for name in ("first", "second"):
        kube.create_token_request(namespace, token_request(name, target=ORDERS))
    for name in ("first", "second"):
        kube.wait_ready(namespace, name, operator=operator)
    old = {name: kube.wait_secret(namespace, name).token for name in ("first", "second")}
    assert old["first"] == old["second"]  # one key, one token
    calls = _requests_for(operator, ORDERS_SCOPE)
    # One call, or none: a Secret an earlier test wrote for the same identity and scope
    # may still hold an unexpired token, and seeding by key id reuses it.
    assert calls <= 1

    _annotate(kube, namespace, "first", "2026-11-29T09:00:00Z")

    wait_for(
        lambda: _handled(kube, namespace, "first", "2026-11-29T09:00:00Z"),
        timeout=30,
        what="status.lastRefreshRequest",
        operator=operator,
    )
    new = {
        name: kube.wait_secret(namespace, name, unlike=old[name], operator=operator).token
        for name in ("first", "second")
    }
    assert new["first"] == new["second"]  # the other TokenRequest got it from the same call
    assert _requests_for(operator, ORDERS_SCOPE) == calls + 1

    # The event is posted after the status that was waited for: wait for it too.
    def posted() -> list[str] | None:
        reasons = _reasons(kube, namespace, "first")
        return reasons if "RefreshRequested" in reasons else None

    reasons = wait_for(
        posted,
        timeout=30,
        what="a RefreshRequested event",
        operator=operator,
    )
    assert reasons.count("RefreshRequested") == 1
    assert "RefreshRequested" not in _reasons(kube, namespace, "second")
    second = kube.get_token_request(namespace, "second")
    assert second is not None
    assert "lastRefreshRequest" not in second["status"]

    # A burst within 10 s coalesces: at most one more call, and each value is recorded.
    _annotate(kube, namespace, "first", "burst-1")
    _annotate(kube, namespace, "first", "burst-2")
    wait_for(
        lambda: _handled(kube, namespace, "first", "burst-2"),
        timeout=30,
        what="the last value of the burst recorded",
        operator=operator,
    )
    assert _requests_for(operator, ORDERS_SCOPE) <= calls + 2


@needs_wiring
def test_a_long_refresh_value_is_recorded_as_a_digest(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    kube.wait_ready(namespace, "orders-api", operator=operator)
    _annotate(kube, namespace, "orders-api", "x" * 5000)

    def recorded() -> str | None:
        body = kube.get_token_request(namespace, "orders-api")
        value = ((body or {}).get("status") or {}).get("lastRefreshRequest")
        return value if isinstance(value, str) else None

    value = wait_for(recorded, timeout=30, what="lastRefreshRequest", operator=operator)
    assert value.startswith("sha256:")
    assert len(value) == 71


@needs_wiring
def test_secret_template_is_copied_kept_and_pruned(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    body = token_request("orders-api", target=ORDERS)
    body["spec"]["secretTemplate"] = {
        "labels": {"team": "shop", "example.com/tier": "backend"},
        "annotations": {"reloader.stakater.com/match": "true"},
    }
    kube.create_token_request(namespace, body)
    kube.wait_ready(namespace, "orders-api", operator=operator)
    secret = kube.wait_secret(namespace, "orders-api", operator=operator)
    assert secret.labels["team"] == "shop"
    assert secret.labels["example.com/tier"] == "backend"
    assert secret.labels["app.kubernetes.io/managed-by"] == "m2m-token-operator"
    assert secret.annotations["reloader.stakater.com/match"] == "true"

    # Another tool labels the Secret; someone edits a template label: repaired, theirs kept.
    kube.core.patch_namespaced_secret(
        "orders-api",
        namespace,
        {"metadata": {"labels": {"argocd.argoproj.io/instance": "shop", "team": "edited"}}},
    )

    def repaired() -> bool:
        live = kube.get_secret(namespace, "orders-api")
        return live is not None and live.labels.get("team") == "shop"

    wait_for(repaired, timeout=30, what="the template label repaired", operator=operator)

    # The template drops a label and the annotation: they leave the Secret, others' stay.
    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "orders-api",
        {"spec": {"secretTemplate": {"labels": {"example.com/tier": None}, "annotations": None}}},
    )

    def pruned() -> dict[str, str] | None:
        live = kube.get_secret(namespace, "orders-api")
        if live is None or "example.com/tier" in live.labels:
            return None
        if "reloader.stakater.com/match" in live.annotations:
            return None
        return live.labels

    labels = wait_for(pruned, timeout=30, what="the dropped template keys removed")
    assert labels["team"] == "shop"
    assert labels["argocd.argoproj.io/instance"] == "shop"
