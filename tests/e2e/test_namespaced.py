"""The namespaced install (manifests/components/namespaced) on a fresh API server.

An overlay as examples/namespaced is written for two served namespaces, rendered
by the pinned kubectl's kustomize, and installed (without the Pod-related kinds,
as devenv.install does); the operator runs with the rendered Deployment's
arguments as its ServiceAccount. A fresh control plane: the session's has the
cluster-wide ClusterRoleBinding of the default install, which would grant
everything this test shows is not granted.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from devenv.controlplane import ControlPlane, new_api_client
from devenv.install import (
    MANIFESTS_DIR,
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    SKIPPED_KINDS,
    install_operator,
)
from devenv.operatorprocess import Identity, OperatorProcess
from devenv.tokenserver import DEFAULT_ISSUER, TokenServer

from ._support import (
    ALL_NAMESPACES,
    CLUSTER_NAME,
    OPERATOR_CLIENT_ID,
    OPERATOR_CLIENT_SECRET,
    Kube,
    kubectl,
    token_request,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("M2M_E2E_EXISTING_CLUSTER") == "1",
    reason="needs a fresh control plane of its own",
)
COMPONENT = MANIFESTS_DIR / "components" / "namespaced"


def _overlay(directory: Path, served: list[str]) -> Path:
    """An overlay like examples/namespaced, for `served`."""

    def relative(path: Path, start: Path) -> str:
        return os.path.relpath(path, start)

    for namespace in served:
        (directory / namespace).mkdir(parents=True)
        per_namespace = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            "resources": [relative(COMPONENT / "served-namespace", directory / namespace)],
        }
        (directory / namespace / "kustomization.yaml").write_text(yaml.safe_dump(per_namespace))
    flags = [
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/args/-",
            "value": f"--namespace={n}",
        }
        for n in served
    ]
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [relative(MANIFESTS_DIR, directory), *served],
        "components": [relative(COMPONENT, directory)],
        "patches": [
            {
                "target": {"kind": "Deployment", "name": "m2m-token-operator"},
                "patch": yaml.safe_dump(flags),
            }
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return directory


@pytest.fixture
def fresh_cluster() -> Iterator[ControlPlane]:
    with ControlPlane(
        extra_apiserver_args=["--enable-admission-plugins=OwnerReferencesPermissionEnforcement"]
    ) as cluster:
        yield cluster


def _can(api: k8s.ApiClient, namespace: str, verb: str, resource: str, group: str = "") -> bool:
    """`kubectl auth can-i` as whoever `api` is: a SelfSubjectAccessReview."""
    review = k8s.V1SelfSubjectAccessReview(
        spec=k8s.V1SelfSubjectAccessReviewSpec(
            resource_attributes=k8s.V1ResourceAttributes(
                namespace=namespace, verb=verb, resource=resource, group=group
            )
        )
    )
    answer = k8s.AuthorizationV1Api(api).create_self_subject_access_review(review)
    return bool(answer.status and answer.status.allowed)


def test_the_namespaced_install_serves_its_namespaces_and_has_no_rights_elsewhere(
    fresh_cluster: ControlPlane, token_server: TokenServer, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:6]
    served = [f"served-{run}-a", f"served-{run}-b"]
    unserved = f"unserved-{run}"
    rendered = kubectl(fresh_cluster, "kustomize", str(_overlay(tmp_path / "overlay", served)))
    assert rendered.returncode == 0, rendered.stderr
    documents: list[dict[str, Any]] = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    # No cluster-wide grant of Secrets or TokenRequests is left; a Role in each served one.
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert ("ClusterRoleBinding", "m2m-token-operator") not in kinds
    assert ("ClusterRole", "m2m-token-operator") not in kinds
    roles = {d["metadata"].get("namespace") for d in documents if d["kind"] == "Role"}
    assert roles == {OPERATOR_NAMESPACE, *served}  # the seal key's Role, and the served
    [deployment] = [d for d in documents if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={n}" for n in served]

    with fresh_cluster.api_client() as admin:
        core = k8s.CoreV1Api(admin)
        for namespace in [*served, unserved]:
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
        install_operator(admin, objects=[d for d in documents if d["kind"] not in SKIPPED_KINDS])
        kube = Kube(admin)
        for namespace in [*served, unserved]:
            kube.create_token_request(namespace, token_request("api", scope="api://x/.default"))

        operator = OperatorProcess(
            kubeconfig=fresh_cluster.service_account_kubeconfig(
                OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT
            ),
            log_file=tmp_path / "operator.log",
            identity=Identity(
                client_id=OPERATOR_CLIENT_ID,
                client_secret=OPERATOR_CLIENT_SECRET,
                token_endpoint=token_server.token_endpoint(DEFAULT_ISSUER),
            ),
            cluster_name=CLUSTER_NAME,
            # As the Deployment runs it; the harness adds its own --liveness.
            args=[*(a for a in args if not a.startswith("--liveness")), "--verbose"],
            settings={
                "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
                "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": f"127.0.0.1:{token_server.port}",
                "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": ALL_NAMESPACES,
            },
        )
        operator.start()
        try:
            for namespace in served:
                kube.wait_ready(namespace, "api", timeout=60, operator=operator)
                kube.wait_secret(namespace, "api", operator=operator)
            # Both served namespaces are Ready: the operator has listed and looked at
            # everything it serves. The third got nothing: no status, no Secret, no event.
            found = kube.get_token_request(unserved, "api")
            assert found is not None
            assert "status" not in found, found["status"]
            assert core.list_namespaced_secret(unserved).items == []
            assert kube.events([unserved]) == []
            assert f"{unserved}/" not in operator.log_text()
            # The restart seal's key was created in the operator's namespace (its Role).
            core.read_namespaced_secret("m2m-token-operator-seal-key", OPERATOR_NAMESPACE)
        finally:
            operator.stop()
            print(operator.log_tail(20000))

        # And it could not have: no right there (`kubectl auth can-i` as its account).
        with new_api_client(operator.kubeconfig) as as_operator:
            for namespace in served:
                assert _can(as_operator, namespace, "create", "secrets")
                assert _can(as_operator, namespace, "list", "tokenrequests", "m2m.dev")
            for verb, resource, group in (
                ("get", "secrets", ""),
                ("create", "secrets", ""),
                ("list", "secrets", ""),
                ("list", "tokenrequests", "m2m.dev"),
                ("patch", "tokenrequests/status", "m2m.dev"),
            ):
                assert not _can(as_operator, unserved, verb, resource, group), (verb, resource)
            # Nor anywhere cluster-wide.
            assert not _can(as_operator, "", "list", "secrets")
