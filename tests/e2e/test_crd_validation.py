"""The shipped CRD rejects bad TokenRequests when they are applied, on a real API server.

The schema's patterns and CEL rules are only trustworthy when a real
kube-apiserver evaluates them: these create TokenRequests as the admin, with
strict field validation as `kubectl` asks for it, and expect HTTP 422 with a
message that names the field. The cases in `crds/testdata/` are run too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from devenv.controlplane import Cluster
from devenv.install import REPO_ROOT, read_documents

from ._support import GROUP, PLURAL, VERSION, Kube, kubectl, parse_table, token_request

pytestmark = pytest.mark.usefixtures("operator_installed")

VALID_SCOPE = "api://e2e.orders.orders-api/.default"
TESTDATA = REPO_ROOT / "crds" / "testdata"

# name -> (spec, a substring of the apiserver's message)
REJECTED: dict[str, tuple[dict[str, Any], str]] = {
    "both-target-and-scope": (
        {"target": {"application": "orders-api"}, "scope": VALID_SCOPE},
        "exactly one of spec.target or spec.scope must be set",
    ),
    "neither-target-nor-scope": (
        {"secretName": "orders-api-token"},
        "exactly one of spec.target or spec.scope must be set",
    ),
    "refresh-before-in-words": (
        {"scope": VALID_SCOPE, "refreshBefore": "10 minutes"},
        "spec.refreshBefore",
    ),
    "secret-name-not-dns": (
        {"scope": VALID_SCOPE, "secretName": "Bad_Name"},
        "spec.secretName",
    ),
    "credentials-in-another-namespace": (
        {"scope": VALID_SCOPE, "credentials": {"secretRef": {"name": "x", "namespace": "other"}}},
        "secretRef.namespace is not supported",
    ),
    "credentials-both-sources": (
        {
            "scope": VALID_SCOPE,
            "credentials": {"secretRef": {"name": "x"}, "serviceAccountRef": {"name": "y"}},
        },
        "exactly one of spec.credentials.secretRef or spec.credentials.serviceAccountRef",
    ),
    "credentials-no-source": (
        {"scope": VALID_SCOPE, "credentials": {}},
        "exactly one of spec.credentials.secretRef or spec.credentials.serviceAccountRef",
    ),
    "service-account-in-another-namespace": (
        {
            "scope": VALID_SCOPE,
            "credentials": {"serviceAccountRef": {"name": "x", "namespace": "other"}},
        },
        "serviceAccountRef.namespace is not supported",
    ),
    "scope-not-api-default": (
        {"scope": "https://graph.microsoft.com/.default"},
        "spec.scope",
    ),
    "scope-without-default": (
        {"scope": "api://e2e.orders.orders-api"},
        "spec.scope",
    ),
}


def _create(
    kube: Kube, namespace: str, body: dict[str, Any], *, strict: bool = True, dry_run: bool = False
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if strict:
        kwargs["field_validation"] = "Strict"
    if dry_run:
        kwargs["dry_run"] = "All"
    created = kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, **kwargs
    )
    return cast(dict[str, Any], created)


def _message(error: ApiException) -> str:
    return str(json.loads(error.body or "{}").get("message"))


def _rejection(error: ApiException) -> str:
    body = json.loads(error.body or "{}")
    assert body["reason"] == "Invalid", body
    return str(body["message"])


@pytest.mark.parametrize(("name", "case"), REJECTED.items(), ids=list(REJECTED))
def test_bad_token_request_is_rejected(
    kube: Kube, namespace: str, name: str, case: tuple[dict[str, Any], str]
) -> None:
    spec, expected = case
    body = {**token_request(name), "spec": spec}

    with pytest.raises(ApiException) as rejected:
        _create(kube, namespace, body)

    assert rejected.value.status == 422
    assert expected in _rejection(rejected.value)
    assert kube.get_token_request(namespace, name) is None


def test_misspelt_field_is_rejected_with_strict_validation(kube: Kube, namespace: str) -> None:
    # What `kubectl apply` does by default: a typo is an error (400), not a silently
    # pruned field and a TokenRequest that ignores what its author asked for.
    body = token_request("typo", scope=VALID_SCOPE)
    body["spec"]["refreshbefore"] = "10m"
    with pytest.raises(ApiException) as rejected:
        _create(kube, namespace, body)
    assert rejected.value.status == 400
    assert 'unknown field "spec.refreshbefore"' in _message(rejected.value)


def test_secret_ref_namespace_is_rejected_without_strict_validation(
    kube: Kube, namespace: str
) -> None:
    # The field is declared only to be refused: it must not be pruned silently
    # for clients that ask for no (or lenient) field validation.
    body = token_request("x", scope=VALID_SCOPE)
    body["spec"]["credentials"] = {"secretRef": {"name": "x", "namespace": namespace}}
    with pytest.raises(ApiException) as rejected:
        _create(kube, namespace, body, strict=False)
    assert rejected.value.status == 422
    assert "secretRef.namespace is not supported" in _rejection(rejected.value)


def test_service_account_ref_namespace_is_rejected_without_strict_validation(
    kube: Kube, namespace: str
) -> None:
    body = token_request("x", scope=VALID_SCOPE)
    body["spec"]["credentials"] = {"serviceAccountRef": {"name": "x", "namespace": namespace}}
    with pytest.raises(ApiException) as rejected:
        _create(kube, namespace, body, strict=False)
    assert rejected.value.status == 422
    assert "serviceAccountRef.namespace is not supported" in _rejection(rejected.value)


def test_service_account_ref_is_accepted_as_written(kube: Kube, namespace: str) -> None:
    body = token_request("federated", scope=VALID_SCOPE)
    body["spec"]["credentials"] = {"serviceAccountRef": {"name": "shop-frontend"}}
    created = _create(kube, namespace, body)
    assert created["spec"] == body["spec"]


def test_valid_token_request_is_accepted_as_written(kube: Kube, namespace: str) -> None:
    body = token_request(
        "orders-api",
        target={"application": "orders-api", "namespace": "orders", "cluster": "prod-gcp"},
        secret_name="orders-api-token",
        refresh_before="10m",
        credentials_secret="azure-shop-frontend",
    )
    created = _create(kube, namespace, body)

    assert created["spec"] == body["spec"]  # nothing defaulted or pruned
    assert created["metadata"]["generation"] == 1
    assert not created["metadata"].get("finalizers")


# --- crds/testdata ---------------------------------------------------------------


@pytest.fixture(scope="module")
def testdata_namespace(control_plane: Cluster, operator_installed: None) -> Iterator[str]:
    with control_plane.api_client() as api:
        core = k8s.CoreV1Api(api)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="e2e-crd-testdata")))
        try:
            yield "e2e-crd-testdata"
        finally:
            core.delete_namespace("e2e-crd-testdata")


def _testdata(file_name: str) -> list[dict[str, Any]]:
    return read_documents(TESTDATA / file_name)


@pytest.mark.parametrize(
    "body", _testdata("invalid.yaml"), ids=lambda body: str(body["metadata"]["name"])[:40]
)
def test_testdata_invalid_is_rejected(
    kube: Kube, testdata_namespace: str, body: dict[str, Any]
) -> None:
    expected = body["metadata"]["annotations"]["test.m2m.dev/expect-error"]
    with pytest.raises(ApiException) as rejected:
        _create(kube, testdata_namespace, body, dry_run=True)
    assert rejected.value.status == 422
    assert expected in _rejection(rejected.value)


@pytest.mark.parametrize(
    "body", _testdata("valid.yaml"), ids=lambda body: str(body["metadata"]["name"])
)
def test_testdata_valid_is_accepted(
    kube: Kube, testdata_namespace: str, body: dict[str, Any]
) -> None:
    created = _create(kube, testdata_namespace, body, dry_run=True)
    assert created["spec"] == body["spec"]


# --- second edition: spec.secretTemplate, status.token, lastRefreshRequest ---------------


def test_secret_template_with_10000_keys_is_rejected(kube: Kube, namespace: str) -> None:
    body = token_request("huge", scope=VALID_SCOPE)
    body["spec"]["secretTemplate"] = {"annotations": {f"k{i}": "v" for i in range(10_000)}}
    with pytest.raises(ApiException) as rejected:
        _create(kube, namespace, body)
    assert rejected.value.status == 422
    message = _rejection(rejected.value)
    assert "spec.secretTemplate.annotations" in message
    assert "must have at most 64 items" in message


def test_secret_template_reserved_key_message_says_what_to_do(kube: Kube, namespace: str) -> None:
    body = token_request("reserved", scope=VALID_SCOPE)
    body["spec"]["secretTemplate"] = {"labels": {"m2m.dev/token-request": "someone-else"}}
    with pytest.raises(ApiException) as rejected:
        _create(kube, namespace, body)
    assert "remove them from the template" in _rejection(rejected.value)


def test_status_token_is_stored_and_shown_in_the_wide_roles_column(
    control_plane: Cluster, kube: Kube, namespace: str
) -> None:
    _create(kube, namespace, token_request("orders-api", scope=VALID_SCOPE))
    status = {
        "token": {
            "audience": "api://e2e.orders.orders-api",
            "clientId": "client-1",
            "tenantId": "tenant-1",
            "roles": ["access_as_application", "orders.read"],
            "issuedAt": "2026-11-29T09:00:00Z",
            "expiresAt": "2026-11-29T10:00:00Z",
        },
        "lastRefreshRequest": "r" * 253,
        # Every other column filled too, so that the table splits into its columns.
        "scope": VALID_SCOPE,
        "secretName": "orders-api",
        "expiresAt": "2026-11-29T10:00:00Z",
        "refreshAt": "2026-11-29T09:40:00Z",
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "TokenIssued", "message": "ok",
             "lastTransitionTime": "2026-11-29T09:00:00Z"},
        ],
    }  # fmt: skip
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "orders-api", {"status": status}
    )
    stored = kube.get_token_request(namespace, "orders-api")
    assert stored is not None
    assert stored["status"] == status

    wide = kubectl(control_plane, "get", "tokreq", "-n", namespace, "-o", "wide")
    assert wide.returncode == 0, wide.stderr
    row = parse_table(wide.stdout)[0]
    assert row["ROLES"] == '["access_as_application","orders.read"]'
    narrow = kubectl(control_plane, "get", "tokreq", "-n", namespace)
    assert "ROLES" not in narrow.stdout

    # Bounded: a value too long for status is refused (the operator stores a digest instead).
    too_long = {"status": {"lastRefreshRequest": "r" * 254}}
    with pytest.raises(ApiException) as rejected:
        kube.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "orders-api", too_long
        )
    assert rejected.value.status == 422
    # A merge patch with null removes a claim a new token lacks.
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "orders-api", {"status": {"token": {"tenantId": None}}}
    )
    patched = kube.get_token_request(namespace, "orders-api")
    assert patched is not None
    assert "tenantId" not in patched["status"]["token"]
    assert patched["status"]["token"]["clientId"] == "client-1"
