"""`helm install`, `helm upgrade` and `helm uninstall` of the chart on a real API server.

There is no kubelet here, so the chart's Deployment cannot run a pod. What the
pod would run is run instead as a process: the operator with the arguments and
environment the installed Deployment holds (read back from the API server),
authenticated as the chart's ServiceAccount, so that the chart's RBAC is what
allows or refuses each call. The walkthrough is docs/install.md's: shipped
defaults, and an application identity Secret (not the opt-in operator identity).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from devenv.controlplane import Cluster, ControlPlane, new_api_client
from devenv.install import ADMISSION_POLICY, wait_for_admission_policy
from devenv.operatorprocess import OperatorProcess
from devenv.tokenserver import TokenServer, jwt_claims

from ._helm import CHART_DIR, RELEASE, helm, values_file
from ._support import Kube, credentials, kubectl, token_request

pytestmark = pytest.mark.skipif(
    os.environ.get("M2M_E2E_EXISTING_CLUSTER") == "1",
    reason="installs and uninstalls cluster-wide objects on a fresh control plane of its own",
)

NAMESPACE = "m2m-token-operator"
APPLICATION = {"application": "orders-api", "namespace": "orders"}


@pytest.fixture(scope="module")
def fresh() -> Iterator[Cluster]:
    with ControlPlane() as cluster:
        yield cluster


def _values(token_server: TokenServer, cluster_name: str) -> dict[str, Any]:
    return {
        "clusterName": cluster_name,
        # The local token server: plain http on 127.0.0.1, which a real install never allows.
        "allowedTokenEndpointHosts": [f"127.0.0.1:{token_server.port}"],
        "extraEnv": [{"name": "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS", "value": "true"}],
        "logging": {"format": "text"},
    }


def _deployment(cluster: Cluster) -> dict[str, Any]:
    got = kubectl(cluster, "-n", NAMESPACE, "get", "deployment", RELEASE, "-o", "json")
    assert got.returncode == 0, got.stderr
    deployment: dict[str, Any] = json.loads(got.stdout)
    return deployment


def _as_the_deployment_runs_it(cluster: Cluster, log_file: Path) -> OperatorProcess:
    """The operator with the installed Deployment's args and env, as its ServiceAccount."""
    pod = _deployment(cluster)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # What the kubelet would provide: the downward API values, and no mounted identity
    # (the chart mounts an optional Secret that this walkthrough does not create).
    env.pop("M2M_CREDENTIALS_DIR")
    env.update(POD_NAMESPACE=NAMESPACE, POD_ID=f"{RELEASE}-replica", M2M_METRICS_PORT="0")
    kubeconfig = cluster.service_account_kubeconfig(NAMESPACE, pod["serviceAccountName"])
    args = [a for a in container["args"] if not a.startswith("--liveness=")]
    return OperatorProcess(
        kubeconfig=kubeconfig,
        log_file=log_file,
        identity=None,
        cluster_name=env["M2M_CLUSTER_NAME"],
        args=args,
        settings=env,
        name="helm-operator",
    )


def _assert_the_policy_denies_a_service_account_token_secret(
    cluster: Cluster, namespace: str
) -> None:
    """As the chart's ServiceAccount, whose ClusterRole allows creating any Secret, a
    `kubernetes.io/service-account-token` Secret is refused by the chart's policy."""
    service_account = _deployment(cluster)["spec"]["template"]["spec"]["serviceAccountName"]
    body: Any = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/service-account-token",
        "metadata": {
            "name": "stolen-token",
            "annotations": {"kubernetes.io/service-account.name": "default"},
        },
    }
    kubeconfig = cluster.service_account_kubeconfig(NAMESPACE, service_account)
    with new_api_client(kubeconfig) as api, pytest.raises(k8s.ApiException) as raised:
        k8s.CoreV1Api(api).create_namespaced_secret(namespace, body)
    assert raised.value.status == 403, raised.value.body
    assert f"ValidatingAdmissionPolicy '{ADMISSION_POLICY}'" in str(raised.value.body)
    assert "m2m-token-operator may only write Opaque Secrets" in str(raised.value.body)


def _first_token(
    kube: Kube, operator: OperatorProcess, namespace: str, name: str
) -> dict[str, Any]:
    kube.create_token_request(
        namespace,
        token_request(name, target=APPLICATION, credentials_secret="orders-client"),
    )
    kube.wait_ready(namespace, name, operator=operator)
    return jwt_claims(kube.wait_secret(namespace, name, operator=operator).token)


def test_install_upgrade_uninstall(
    fresh: Cluster, token_server: TokenServer, tmp_path: Path
) -> None:
    admin = fresh.kubeconfig
    installed = helm(
        "install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--create-namespace",
        "--values", str(values_file(tmp_path, _values(token_server, "before"), "before.yaml")),
        kubeconfig=admin,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert "STATUS: deployed" in installed.stdout
    # One pass: the CRDs came from crds/, before the objects that need them.
    for crd in ("tokenrequests.m2m.dev", "clusterkopfpeerings.kopf.dev"):
        assert kubectl(fresh, "get", "crd", crd).returncode == 0, crd

    with fresh.api_client() as api:
        kube = Kube(api)
        k8s.CoreV1Api(api).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="shop")))
        # The chart's admission policy (on by default), once the API server enforces
        # it: the operator's own writes below pass under it, and what it forbids is denied.
        wait_for_admission_policy(api)
        _assert_the_policy_denies_a_service_account_token_secret(fresh, "shop")
        # docs/install.md's walkthrough: an application identity Secret, then a TokenRequest.
        kube.create_secret(
            "shop",
            "orders-client",
            credentials("e2e-shop", "e2e-shop-secret-123", token_server.token_endpoint()),
        )

        with _as_the_deployment_runs_it(fresh, tmp_path / "install.log") as operator:
            # The chart's RBAC lets it create the peering object it waits for.
            operator.wait_for_log(f"Created the ClusterKopfPeering {RELEASE}", timeout=30)
            claims = _first_token(kube, operator, "shop", "orders")
        assert claims["sub"] == "e2e-shop"
        assert claims["aud"] == "api://before.orders.orders-api/.default"

        upgraded = helm(
            "upgrade", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE,
            "--values", str(values_file(tmp_path, _values(token_server, "after"), "after.yaml")),
            kubeconfig=admin,
        )  # fmt: skip
        assert upgraded.returncode == 0, upgraded.stderr
        assert "REVISION: 2" in upgraded.stdout
        with _as_the_deployment_runs_it(fresh, tmp_path / "upgrade.log") as operator:
            assert operator.settings["M2M_CLUSTER_NAME"] == "after"
            claims = _first_token(kube, operator, "shop", "orders-after")
        assert claims["aud"] == "api://after.orders.orders-api/.default"

        uninstalled = helm("uninstall", RELEASE, "--namespace", NAMESPACE, kubeconfig=admin)
        assert uninstalled.returncode == 0, uninstalled.stderr
        # Helm removed what it templated ...
        for kind, name in (
            ("clusterrole", RELEASE),
            ("validatingadmissionpolicy", ADMISSION_POLICY),
            ("validatingadmissionpolicybinding", ADMISSION_POLICY),
        ):
            gone = kubectl(fresh, "get", kind, name)
            assert gone.returncode != 0, kind
            assert "NotFound" in gone.stderr, kind
        # ... and kept the API and the tokens: CRDs in crds/ are never deleted by helm,
        # so the TokenRequests and the Secrets they own stay.
        assert kubectl(fresh, "get", "crd", "tokenrequests.m2m.dev").returncode == 0
        assert {tr["metadata"]["name"] for tr in kube.list_token_requests("shop")} == {
            "orders",
            "orders-after",
        }
        for name in ("orders", "orders-after"):
            secret = kube.get_secret("shop", name)
            assert secret is not None
            assert secret.token


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


def test_namespaced_mode_serves_its_namespaces_with_rights_there_only(
    token_server: TokenServer, tmp_path: Path
) -> None:
    """`rbac.namespaced` installed by helm: the operator, as the chart's ServiceAccount
    with the Deployment's args, serves a served namespace under the chart's Roles and
    admission policy, and has no right on Secrets or TokenRequests elsewhere."""
    served, unserved = "team-a", "team-z"
    with ControlPlane() as cluster, cluster.api_client() as api:
        core = k8s.CoreV1Api(api)
        for namespace in (served, unserved):
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
        values = {
            **_values(token_server, "namespaced"),
            "rbac": {"namespaced": True, "servedNamespaces": [served]},
        }
        installed = helm(
            "install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--create-namespace",
            "--values", str(values_file(tmp_path, values)),
            kubeconfig=cluster.kubeconfig,
        )  # fmt: skip
        assert installed.returncode == 0, installed.stderr
        wait_for_admission_policy(api)
        kube = Kube(api)
        for namespace in (served, unserved):
            kube.create_secret(
                namespace,
                "orders-client",
                credentials("e2e-shop", "e2e-shop-secret-123", token_server.token_endpoint()),
            )

        with _as_the_deployment_runs_it(cluster, tmp_path / "namespaced.log") as operator:
            assert f"--namespace={served}" in operator.args
            claims = _first_token(kube, operator, served, "orders")
            # The restart seal's key, in the release namespace (its Role; the policy's seal key).
            core.read_namespaced_secret("m2m-token-operator-seal-key", NAMESPACE)
        assert claims["aud"] == "api://namespaced.orders.orders-api/.default"

        kubeconfig = cluster.service_account_kubeconfig(NAMESPACE, RELEASE)
        with new_api_client(kubeconfig) as as_operator:
            assert _can(as_operator, served, "create", "secrets")
            assert _can(as_operator, served, "list", "tokenrequests", "m2m.dev")
            for verb, resource, group in (
                ("get", "secrets", ""),
                ("create", "secrets", ""),
                ("list", "tokenrequests", "m2m.dev"),
                ("patch", "tokenrequests/status", "m2m.dev"),
            ):
                assert not _can(as_operator, unserved, verb, resource, group), (verb, resource)
            assert not _can(as_operator, "", "list", "secrets")
            assert not _can(as_operator, "", "list", "tokenrequests", "m2m.dev")
