"""`kubectl m2m refresh -l/-A/--all` as the shipped refresh-only ClusterRole, on a real API server.

After a credential rotation every TokenRequest using the rotated Secret needs a
new token: one command, run by someone who holds `m2m-token-operator:refresh`
(patch on TokenRequests, no create or delete), marks them all.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client as k8s

from devenv.controlplane import Cluster

from ._support import Kube, NamespaceFactory, token_request, wait_for
from .test_kubectl_plugin import SCOPE, plugin

pytestmark = pytest.mark.usefixtures("operator_installed")


def _labelled(name: str, labels: dict[str, str]) -> dict[str, Any]:
    body = token_request(name, scope=SCOPE)
    body["metadata"]["labels"] = labels
    return body


def _refresh_annotation(kube: Kube, namespace: str, name: str) -> str | None:
    body = kube.get_token_request(namespace, name)
    assert body is not None
    value: str | None = (body["metadata"].get("annotations") or {}).get("m2m.dev/refresh")
    return value


def test_refresh_by_selector_across_namespaces_as_the_refresh_role(
    control_plane: Cluster, kube: Kube, new_namespace: NamespaceFactory
) -> None:
    first, second = new_namespace(), new_namespace()
    rotated = {"credentials": "shop-frontend"}
    kube.create_token_request(first, _labelled("orders", rotated))
    kube.create_token_request(first, _labelled("payments", {"credentials": "other"}))
    kube.create_token_request(second, _labelled("orders", rotated))

    # A person who may refresh (cluster-wide here, for -A), and nothing more.
    rbac = k8s.RbacAuthorizationV1Api(kube.api)
    kube.core.create_namespaced_service_account(
        first, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="rotator"))
    )
    binding: Any = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": f"rotator-{first}"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "m2m-token-operator:refresh",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "rotator", "namespace": first}],
    }
    rbac.create_cluster_role_binding(binding)
    try:
        rotator = control_plane.service_account_kubeconfig(first, "rotator")
        before = datetime.now(UTC).replace(microsecond=0)

        def refreshed() -> Any:
            result = plugin(rotator, "refresh", "-l", "credentials=shop-frontend", "-A")
            return result if result.returncode == 0 else None  # RBAC takes a moment

        result = wait_for(refreshed, timeout=30, what="the rotator's binding to take effect")
        assert f"requested {first}/orders" in result.stdout
        assert f"requested {second}/orders" in result.stdout
        # Other namespaces' TokenRequests of the session may match nothing: exactly two did.
        assert "Refresh requested for 2 of 2 TokenRequests in all namespaces" in result.stdout
        for namespace in (first, second):
            value = _refresh_annotation(kube, namespace, "orders")
            assert value is not None
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            assert before <= moment <= datetime.now(UTC) + timedelta(seconds=1)
        assert _refresh_annotation(kube, first, "payments") is None

        # --all in one namespace; the role grants no more than refreshing.
        everything = plugin(rotator, "refresh", "--all", "-n", first)
        assert everything.returncode == 0, everything.stderr
        assert "Refresh requested for 2 of 2 TokenRequests in namespace" in everything.stdout
        assert _refresh_annotation(kube, first, "payments") is not None
        status = plugin(rotator, "status", "orders", "-n", first)
        assert "(you may not list events" in status.stdout  # read and patch, nothing else
    finally:
        rbac.delete_cluster_role_binding(f"rotator-{first}")
