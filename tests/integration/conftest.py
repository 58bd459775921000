"""Fixtures for running the real operator (Kopf, in this process) against the real API server.

* ``control_plane`` (session): etcd, kube-apiserver and kube-controller-manager
  from ``devenv`` (about 3 s once the binaries are cached, ``make binaries``),
  with the shipped CRD, namespace, ServiceAccount, RBAC and peering CRDs installed
  by ``devenv.install`` (as in the e2e tier).
* ``garbage_collector`` (session): waits until the garbage collector watches
  TokenRequests; for the tests that need it to delete a Secret whose owner is gone.
* ``operator_token`` (session): a token of the operator's ServiceAccount: the
  operator has exactly the rights ``manifests/`` grants.
* ``proxy``: a fresh :class:`devenv.faultproxy.FaultProxy` per test, between the
  operator and the API server (rules, record, open watches start empty).
* ``kube``: the test's handle on the cluster (``harness.Kube``): admin clients
  that go straight to the API server, helpers, a per-test namespace suffix, the
  history of the test's TokenRequests and Secrets, and the proxy.
* ``token_endpoint``: a real OAuth 2.0 client-credentials endpoint on loopback.
* ``operator_env``: the operator's environment (monkeypatched): KUBECONFIG is
  a kubeconfig for the proxy with the ServiceAccount's token.
* ``operator_factory`` / ``operator``: start, stop, restart the operator.

The operator, the proxy and the token endpoint each run in their own threads,
so a test (sync or async) may call the blocking ``kubernetes`` client directly.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from devenv.controlplane import ControlPlane, new_api_client, request_service_account_token
from devenv.faultproxy import FaultProxy
from devenv.install import OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, install_operator
from m2m_token_operator.api.constants import DEFAULT_SEAL_SECRET_NAME as SEAL_KEY_SECRET
from m2m_token_operator.reconcile.seal import new_key_secret

from .harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    CLUSTER_NAME,
    GROUP,
    PLURAL,
    VERSION,
    Kube,
    OperatorFactory,
    OperatorRun,
    TokenEndpoint,
    write_kubeconfig,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The operator runs in real threads on real time: never under looptime's fake clock,
    # even with `pytest --looptime`.
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.looptime(False))


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """The real control plane for the whole session, with the operator's API and RBAC.

    ``OwnerReferencesPermissionEnforcement`` as on most production clusters (and in
    e2e): setting blockOwnerDeletion then needs `update` on the owner's finalizers.
    """
    log_dir = os.environ.get("M2M_INTEGRATION_LOG_DIR")
    with ControlPlane(
        log_dir=Path(log_dir) if log_dir else None,
        extra_apiserver_args=["--enable-admission-plugins=OwnerReferencesPermissionEnforcement"],
    ) as cluster:
        with cluster.api_client() as api:
            install_operator(api)
            # The restart seal's key Secret, as a running cluster has it (the operator's
            # first start creates it; the e2e tests cover that). Made here, not through the
            # proxy: tests that count or fail Secret requests see the operator's only.
            seal_key: Any = new_key_secret(OPERATOR_NAMESPACE, SEAL_KEY_SECRET)
            kubernetes.client.CoreV1Api(api).create_namespaced_secret(OPERATOR_NAMESPACE, seal_key)
        yield cluster


@pytest.fixture(scope="session")
def garbage_collector(control_plane: ControlPlane) -> None:
    """Wait until the garbage collector watches TokenRequests (for tests that need it to
    delete a Secret whose owner is gone).

    kube-controller-manager looks for new resource types every 30 s; an owner of a type it
    does not monitor yet leaves its dependents in place (retried with a growing backoff).
    The signal: a TokenRequest deleted in the foreground is gone, which only the garbage
    collector can do (it removes the ``foregroundDeletion`` finalizer).
    """
    with control_plane.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        custom = kubernetes.client.CustomObjectsApi(api)
        namespace = f"gc-probe-{uuid.uuid4().hex[:8]}"
        body: Any = {"metadata": {"name": namespace}}
        core.create_namespace(body)
        probe: Any = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TokenRequest",
            "metadata": {"name": "gc-probe"},
            "spec": {"scope": "api://gc-probe/.default"},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, probe)
        options: Any = {"propagationPolicy": "Foreground"}
        custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "gc-probe", body=options
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gc-probe")
            except kubernetes.client.ApiException as error:
                if error.status == 404:
                    break
                raise
            if time.monotonic() > deadline:
                raise TimeoutError("the garbage collector did not take up TokenRequests in 120 s")
            time.sleep(0.2)  # polling for the positive signal above
        core.delete_namespace(namespace)


@pytest.fixture(scope="session")
def operator_token(control_plane: ControlPlane) -> str:
    """A bound token of the operator's ServiceAccount, valid longer than any session."""
    with control_plane.api_client() as api:
        return request_service_account_token(
            api, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, expiration_seconds=4 * 3600
        )


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[FaultProxy]:
    with FaultProxy(control_plane.server, ca_file=control_plane.ca_file) as running:
        yield running


@pytest.fixture
def kube(control_plane: ControlPlane, proxy: FaultProxy) -> Iterator[Kube]:
    api = new_api_client(control_plane.kubeconfig)
    cluster = Kube(api, proxy, suffix=uuid.uuid4().hex[:8])
    try:
        yield cluster
    finally:
        cluster.close()
        api.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    endpoint = TokenEndpoint()
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.stop()


@pytest.fixture
def operator_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    proxy: FaultProxy,
    operator_token: str,
    token_endpoint: TokenEndpoint,
) -> dict[str, str]:
    kubeconfig = write_kubeconfig(tmp_path / "operator.kubeconfig", proxy.url, operator_token)
    env = {
        "KUBECONFIG": str(kubeconfig),
        "AZURE_APP_CLIENT_ID": CLIENT_ID,
        "AZURE_APP_CLIENT_SECRET": CLIENT_SECRET,
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": token_endpoint.url,
        "M2M_CLUSTER_NAME": CLUSTER_NAME,
        "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
        "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": "127.0.0.1",
        "M2M_RETRY_INITIAL_SECONDS": "0.2",
        "M2M_RETRY_MAX_SECONDS": "2",
        "M2M_METRICS_PORT": "0",
        # Every namespace may use the operator's own identity (the label every namespace has).
        "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": "kubernetes.io/metadata.name",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    # In-cluster config must not win over KUBECONFIG; proxies must not see loopback traffic;
    # Kopf's legacy single-namespace variable must not narrow --all-namespaces.
    for name in (
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "KOPF_RUN_NAMESPACE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The kubernetes client reads $KUBECONFIG once, when it is imported (long before this
    # fixture), into KUBE_CONFIG_DEFAULT_LOCATION; load_kube_config() reads that constant.
    monkeypatch.setattr(
        kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", env["KUBECONFIG"]
    )
    monkeypatch.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", env["KUBECONFIG"])
    return env


@pytest.fixture
def operator_factory(
    kube: Kube, operator_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[OperatorFactory]:
    factory = OperatorFactory(kube, monkeypatch)
    try:
        yield factory
    finally:
        failures = factory.stop_all()
        if failures:
            raise failures[0]


@pytest.fixture
def operator(operator_factory: OperatorFactory) -> OperatorRun:
    return operator_factory.start()
