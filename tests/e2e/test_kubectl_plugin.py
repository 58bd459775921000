"""`kubectl m2m` on a real API server, as the installed console script, with real RBAC.

No operator runs here: the plugin reads what the operator writes (status,
events), so the tests write those as the admin; pods are created as objects
(there is no kubelet) and only need to exist for `doctor` to read them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client as k8s

from devenv.binaries import ensure_binaries
from devenv.controlplane import Cluster

from ._support import GROUP, PLURAL, VERSION, Kube, token_request, wait_for

pytestmark = pytest.mark.usefixtures("operator_installed")

SCOPE = "api://e2e.orders.orders-api/.default"
PLUGIN = Path(sys.executable).parent / "kubectl-m2m"
CLAIMS = {
    "audience": "api://e2e.orders.orders-api",
    "clientId": "e2e-shop-frontend",
    "tenantId": "e2e-tenant",
    "roles": ["access_as_application"],
    "issuedAt": "2026-11-29T09:00:00Z",
    "expiresAt": "2099-11-29T10:00:00Z",
}


def plugin(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The console script as a user runs it, with only that user's kubeconfig."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR") if key in os.environ}
    return subprocess.run(
        [str(PLUGIN), *args, f"--kubeconfig={kubeconfig}"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )


def write_status(kube: Kube, namespace: str, name: str, status: dict[str, Any]) -> None:
    """What the operator would have written."""
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}
    )


def operator_status(secret_name: str) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "observedGeneration": 1,
        "scope": SCOPE,
        "secretName": secret_name,
        "expiresAt": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "refreshAt": (now + timedelta(minutes=40)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "failedAttempts": 0,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "TokenIssued",
             "message": f"Secret {secret_name} holds a token", "lastTransitionTime": stamp},
            {"type": "Degraded", "status": "False", "reason": "RefreshSucceeded",
             "message": "The last token request succeeded", "lastTransitionTime": stamp},
        ],
        "token": CLAIMS,
    }  # fmt: skip


@pytest.fixture
def orders(kube: Kube, namespace: str) -> dict[str, Any]:
    """A TokenRequest with a status and an event, as if the operator had served it."""
    created = kube.create_token_request(
        namespace, token_request("orders-api", scope=SCOPE, secret_name="orders-token")
    )
    write_status(kube, namespace, "orders-api", operator_status("orders-token"))
    now = datetime.now(UTC)
    kube.core.create_namespaced_event(
        namespace,
        k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(generate_name="orders-api."),
            involved_object=k8s.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind="TokenRequest",
                name="orders-api",
                namespace=namespace,
                uid=created["metadata"]["uid"],
            ),
            type="Normal",
            reason="TokenIssued",
            message="Token issued for the e2e scope",
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=k8s.V1EventSource(component="m2m-token-operator"),
        ),
    )
    return created


def test_status_shows_conditions_expiry_claims_and_events(
    control_plane: Cluster, namespace: str, orders: dict[str, Any]
) -> None:
    result = plugin(control_plane.kubeconfig, "status", "orders-api", "-n", namespace)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"TokenRequest {namespace}/orders-api\n")
    assert "Ready:                True (TokenIssued)" in text
    assert "Secret:               orders-token" in text
    assert "(in 59m)" in text or "(in 1h0m)" in text  # expiry, relative to now
    assert "Roles:                access_as_application" in text
    assert "Client ID:            e2e-shop-frontend" in text
    assert "TokenIssued: Token issued for the e2e scope" in text


def test_status_through_kubectl_finds_the_plugin_on_path(
    control_plane: Cluster, namespace: str, orders: dict[str, Any]
) -> None:
    env = {key: os.environ[key] for key in ("HOME", "TMPDIR") if key in os.environ}
    env["PATH"] = f"{PLUGIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        [str(ensure_binaries().kubectl), "m2m", "status", "orders-api", "-n", namespace,
         f"--kubeconfig={control_plane.kubeconfig}"],
        capture_output=True, text=True, check=False, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"TokenRequest {namespace}/orders-api" in result.stdout


def test_claims_as_json_and_yaml(
    control_plane: Cluster, namespace: str, orders: dict[str, Any]
) -> None:
    as_json = plugin(
        control_plane.kubeconfig, "claims", "orders-api", "-n", namespace, "-o", "json"
    )
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == CLAIMS
    as_yaml = plugin(control_plane.kubeconfig, "claims", "orders-api", "-n", namespace)
    assert as_yaml.returncode == 0
    assert "- access_as_application" in as_yaml.stdout


def test_claims_without_status_token_says_so(
    control_plane: Cluster, kube: Kube, namespace: str
) -> None:
    kube.create_token_request(namespace, token_request("fresh", scope=SCOPE))
    result = plugin(control_plane.kubeconfig, "claims", "fresh", "-n", namespace)
    assert result.returncode == 1
    assert "has no status.token yet" in result.stderr


def test_refresh_sets_the_annotation_to_now(
    control_plane: Cluster, kube: Kube, namespace: str, orders: dict[str, Any]
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    result = plugin(control_plane.kubeconfig, "refresh", "orders-api", "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert "Refresh requested" in result.stdout
    body = kube.get_token_request(namespace, "orders-api")
    assert body is not None
    value = body["metadata"]["annotations"]["m2m.dev/refresh"]
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert before <= moment <= datetime.now(UTC) + timedelta(seconds=1)
    assert body["metadata"]["generation"] == 1  # metadata only: the spec did not change


def test_not_found_exits_1(control_plane: Cluster, namespace: str) -> None:
    for command in ("status", "claims", "refresh"):
        result = plugin(control_plane.kubeconfig, command, "missing", "-n", namespace)
        assert result.returncode == 1, command
        assert f"TokenRequest missing not found in namespace {namespace}" in result.stderr


def _wait_for_default_service_account(kube: Kube, namespace: str) -> None:
    """Pods are admitted only once the controller manager made the `default` account."""

    def exists() -> bool:
        accounts = kube.core.list_namespaced_service_account(namespace).items
        return any(a.metadata is not None and a.metadata.name == "default" for a in accounts)

    wait_for(exists, timeout=30, what=f"ServiceAccount {namespace}/default")


def _pod(name: str, **spec: Any) -> dict[str, Any]:
    containers = spec.pop("containers", [{"name": "app", "image": "registry.invalid/app:1"}])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": containers, "automountServiceAccountToken": False, **spec},
    }


def test_doctor_lists_consumers_that_never_see_a_refresh(
    control_plane: Cluster, kube: Kube, namespace: str, orders: dict[str, Any]
) -> None:
    _wait_for_default_service_account(kube, namespace)
    image = "registry.invalid/app:1"
    pods = [
        _pod("uses-env", containers=[{"name": "app", "image": image, "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "orders-token",
                                                             "key": "token"}}}]}]),
        _pod("uses-envfrom", initContainers=[{"name": "setup", "image": image, "envFrom": [
            {"secretRef": {"name": "orders-token"}}]}]),
        _pod("uses-subpath",
             volumes=[{"name": "tok", "secret": {"secretName": "orders-token"}}],
             containers=[{"name": "app", "image": image, "volumeMounts": [
                 {"name": "tok", "mountPath": "/var/run/token", "subPath": "token"}]}]),
        _pod("uses-projected-subpath",
             volumes=[{"name": "all", "projected": {"sources": [
                 {"secret": {"name": "orders-token"}}]}}],
             containers=[{"name": "app", "image": image, "volumeMounts": [
                 {"name": "all", "mountPath": "/etc/token", "subPath": "token"}]}]),
        _pod("mounts-the-volume",
             volumes=[{"name": "tok", "secret": {"secretName": "orders-token"}}],
             containers=[{"name": "app", "image": image, "volumeMounts": [
                 {"name": "tok", "mountPath": "/var/run/m2m"}]}]),
    ]  # fmt: skip
    for body in pods:
        kube.core.create_namespaced_pod(namespace, cast(Any, body))  # plain JSON, as sent

    result = plugin(control_plane.kubeconfig, "doctor", namespace)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"4 way(s) in namespace {namespace} that never see a refreshed token")
    assert "pod uses-env, container app: env TOKEN from key token" in text
    assert "pod uses-envfrom, container init:setup: envFrom" in text
    assert "pod uses-subpath, container app: volume tok mounted with subPath token" in text
    assert "pod uses-projected-subpath, container app: volume all" in text
    assert "mounts-the-volume" not in text
    assert text.count("    fix: ") == 4


def test_without_permission_the_plugin_says_so_and_exits_2(
    control_plane: Cluster, kube: Kube, namespace: str, orders: dict[str, Any]
) -> None:
    """A user who may read TokenRequests (the aggregated view role) but not list pods."""
    kube.core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="reader"))
    )
    binding: Any = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "reader"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "m2m-token-operator:view",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }
    k8s.RbacAuthorizationV1Api(kube.api).create_namespaced_role_binding(namespace, binding)
    reader = control_plane.service_account_kubeconfig(namespace, "reader", expiration_seconds=600)

    def can_read() -> subprocess.CompletedProcess[str] | None:
        result = plugin(reader, "status", "orders-api", "-n", namespace)
        return result if result.returncode == 0 else None  # RBAC takes effect in a moment

    status = wait_for(can_read, timeout=30, what="the reader's RoleBinding to take effect")
    assert "Roles:                access_as_application" in status.stdout
    assert "(you may not list events" in status.stdout  # shown, not fatal

    doctor = plugin(reader, "doctor", namespace)
    assert doctor.returncode == 2
    assert doctor.stderr.startswith(f"kubectl m2m: you may not list pods in namespace {namespace}:")
    assert "forbidden" in doctor.stderr

    refresh = plugin(reader, "refresh", "orders-api", "-n", namespace)
    assert refresh.returncode == 2
    assert "you may not patch tokenrequests.m2m.dev orders-api" in refresh.stderr

    elsewhere = plugin(reader, "doctor", "default")
    assert elsewhere.returncode == 2
    assert "you may not list tokenrequests.m2m.dev in namespace default" in elsewhere.stderr
