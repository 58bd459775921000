"""The shipped ValidatingAdmissionPolicy (manifests/admission-policy.yaml) on a real API server.

Every request here is made as the operator's ServiceAccount, with exactly the
RBAC that manifests/ grants it (cluster-wide `create/update/delete` on Secrets):
what RBAC allows and the policy forbids is denied with the policy's message.
The harness (`devenv.install.install_operator`) has waited until the policy is
enforced, so every other e2e and integration test runs the operator under it:
they are the proof that the operator's own writes pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from devenv.controlplane import new_api_client
from devenv.install import ADMISSION_POLICY
from devenv.operatorprocess import OperatorProcess

from ._support import API_VERSION, MANAGED_BY, Kube, token_request, wait_for

WRITE_MESSAGE = "m2m-token-operator may only write Opaque Secrets labelled"
UPDATE_MESSAGE = "m2m-token-operator may only update or delete Opaque Secrets"
OWNER_MESSAGE = "m2m-token-operator may not give a Secret another controller owner"


@pytest.fixture
def as_operator(operator_kubeconfig: Path) -> Iterator[k8s.CoreV1Api]:
    """The core API as the operator's ServiceAccount."""
    with new_api_client(operator_kubeconfig) as api:
        yield k8s.CoreV1Api(api)


def _owner(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    """A controller owner reference to a real TokenRequest (no operator runs: it stays idle)."""
    created = kube.create_token_request(namespace, token_request(name, scope="api://x/.default"))
    return {
        "apiVersion": API_VERSION,
        "kind": "TokenRequest",
        "name": name,
        "uid": created["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _secret(
    name: str,
    *,
    secret_type: str = "Opaque",
    labelled: bool = True,
    owner: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
) -> Any:
    metadata: dict[str, Any] = {"name": name, "annotations": annotations or {}}
    if labelled:
        metadata["labels"] = dict([MANAGED_BY])
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Secret", "type": secret_type, "metadata": metadata}


def _read(api: k8s.CoreV1Api, namespace: str, name: str) -> Any:
    """A Secret as the API sends it (a dict), to edit and send back."""
    response: Any = api.read_namespaced_secret(name, namespace, _preload_content=False)
    return json.loads(response.data)


def _denied(call: Any, message: str) -> None:
    """`call()` is refused with HTTP 403 by the policy, with `message`."""
    with pytest.raises(k8s.ApiException) as raised:
        call()
    assert raised.value.status == 403, raised.value.body
    body = str(raised.value.body)
    assert f"ValidatingAdmissionPolicy '{ADMISSION_POLICY}'" in body, body
    assert message in body, body


def test_the_operator_may_not_create_a_service_account_token_secret(
    as_operator: k8s.CoreV1Api, kube: Kube, namespace: str
) -> None:
    token_secret = {"kubernetes.io/service-account.name": "default"}
    # Plain, and dressed up as ours (label and owner): the type alone is refused.
    plain = _secret("sa-token", secret_type="kubernetes.io/service-account-token", labelled=False)
    plain["metadata"]["annotations"] = token_secret
    dressed = _secret(
        "sa-token-dressed",
        secret_type="kubernetes.io/service-account-token",
        owner=_owner(kube, namespace, "api"),
        annotations=token_secret,
    )

    for body in (plain, dressed):
        _denied(
            lambda body=body: as_operator.create_namespaced_secret(namespace, body), WRITE_MESSAGE
        )
        assert kube.get_secret(namespace, body["metadata"]["name"]) is None


def test_the_operator_may_not_create_a_secret_without_a_tokenrequest_owner(
    as_operator: k8s.CoreV1Api, kube: Kube, namespace: str
) -> None:
    owner = _owner(kube, namespace, "api")
    not_controller = {**owner, "controller": False}
    # No blockOwnerDeletion: OwnerReferencesPermissionEnforcement would refuse it first.
    other_kind = {**owner, "apiVersion": "v1", "kind": "ConfigMap", "blockOwnerDeletion": False}
    cases = {
        "no-owner": _secret("no-owner"),
        "no-label": _secret("no-label", labelled=False, owner=owner),
        "not-controller": _secret("not-controller", owner=not_controller),
        "other-kind": _secret("other-kind", owner=other_kind),
    }

    for name, body in cases.items():
        _denied(
            lambda body=body: as_operator.create_namespaced_secret(namespace, body), WRITE_MESSAGE
        )
        assert kube.get_secret(namespace, name) is None, name
    # Not in its own namespace either, except the seal key.
    _denied(
        lambda: as_operator.create_namespaced_secret("m2m-token-operator", _secret("planted")),
        WRITE_MESSAGE,
    )


def test_the_operator_may_not_update_or_delete_a_secret_that_is_not_its_own(
    as_operator: k8s.CoreV1Api, kube: Kube, namespace: str
) -> None:
    theirs = kube.create_secret(namespace, "theirs", {"password": "hunter2"})
    # Taking it over: our label and an owner reference on someone else's Secret.
    taken = _read(as_operator, namespace, "theirs")
    taken["metadata"]["labels"] = dict([MANAGED_BY])
    taken["metadata"]["ownerReferences"] = [_owner(kube, namespace, "api")]

    _denied(
        lambda: as_operator.replace_namespaced_secret("theirs", namespace, taken), UPDATE_MESSAGE
    )
    _denied(lambda: as_operator.delete_namespaced_secret("theirs", namespace), UPDATE_MESSAGE)
    after = kube.get_secret(namespace, "theirs")
    assert after is not None
    assert after.resource_version == theirs.resource_version


def test_the_operator_may_write_its_own_secrets_but_not_move_them(
    as_operator: k8s.CoreV1Api, kube: Kube, namespace: str
) -> None:
    owner = _owner(kube, namespace, "api")
    as_operator.create_namespaced_secret(namespace, _secret("api", owner=owner))
    # A person strips the label; the operator puts it back (an update of an owned
    # Secret whose old object lacks the label).
    unlabelled = _read(kube.core, namespace, "api")
    unlabelled["metadata"]["labels"] = {}
    kube.core.replace_namespaced_secret("api", namespace, unlabelled)
    relabelled = _read(as_operator, namespace, "api")
    relabelled["metadata"]["labels"] = dict([MANAGED_BY])
    as_operator.replace_namespaced_secret("api", namespace, relabelled)
    after = kube.get_secret(namespace, "api")
    assert after is not None
    assert after.labels == dict([MANAGED_BY])

    moved = _read(as_operator, namespace, "api")
    moved["metadata"]["ownerReferences"] = [_owner(kube, namespace, "other")]
    _denied(lambda: as_operator.replace_namespaced_secret("api", namespace, moved), OWNER_MESSAGE)

    as_operator.delete_namespaced_secret("api", namespace)
    assert kube.get_secret(namespace, "api") is None


def test_the_operator_repairs_its_secret_under_the_policy(
    operator: OperatorProcess, kube: Kube, namespace: str
) -> None:
    kube.create_token_request(namespace, token_request("api", scope="api://x/.default"))
    kube.wait_ready(namespace, "api", operator=operator)
    secret = kube.wait_secret(namespace, "api", operator=operator)
    # Label stripped (the owned-Secrets watch no longer sees it) and data edited:
    # the operator rewrites it, label included, as the policy's UPDATE rule allows.
    edited = _read(kube.core, namespace, "api")
    edited["metadata"]["labels"] = {}
    edited["data"]["token"] = "ZWRpdGVk"
    kube.core.replace_namespaced_secret("api", namespace, edited)

    def repaired() -> bool:
        now = kube.get_secret(namespace, "api")
        return (
            now is not None
            and now.labels.get(MANAGED_BY[0]) == MANAGED_BY[1]
            and now.token == secret.token
        )

    wait_for(repaired, timeout=30, what="the label and the token put back", operator=operator)
    assert "SecretWriteFailed" not in operator.log_text()
