"""Fixtures for running the real operator (Kopf) against an emulated API server and token endpoint.

* ``kube``: a stateful Kubernetes API on http://127.0.0.1:<port> (``KubeEmulator``,
  kmock 0.8 plus the API server semantics the operator relies on), the CRDs
  from ``crds/`` declared and stored, namespace ``default``; a kubeconfig file
  for it (``kube.kubeconfig``); the test's own ``kube.core`` / ``kube.custom``
  clients and helpers (see ``harness.Kube``).
* ``token_endpoint``: a real OAuth 2.0 client-credentials endpoint on loopback
  (``harness.TokenEndpoint``): fresh unique tokens by default, programmable.
* ``operator_env``: the operator's environment (monkeypatched), returned as a dict.
* ``operator_factory``: starts, stops, restarts the operator (``harness.OperatorFactory``).
* ``operator``: the operator, started and watching (``harness.OperatorRun``).

Everything is function-scoped and starts in well under a second; the operator,
the emulator and the token endpoint each run in their own threads, so a test
(sync or async) may call the blocking ``kubernetes`` client directly.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator

import kubernetes
import pytest

from ._emulator import EmulatorServer
from .harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    CLUSTER_NAME,
    Kube,
    OperatorFactory,
    OperatorRun,
    TokenEndpoint,
    declare_cluster,
    write_kubeconfig,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The operator runs in real threads on real time: never under looptime's fake clock,
    # even with `pytest --looptime`.
    for item in items:
        if "tests/integration/" in item.nodeid.replace("\\", "/") or item.nodeid.startswith(
            "integration/"
        ):
            item.add_marker(pytest.mark.looptime(False))


@pytest.fixture
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    server = EmulatorServer(setup=declare_cluster)
    server.start()
    kubeconfig = write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig", server.url)
    cluster = Kube(server, kubeconfig)
    try:
        yield cluster
    finally:
        cluster.close()
        server.stop()


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
    monkeypatch: pytest.MonkeyPatch, kube: Kube, token_endpoint: TokenEndpoint
) -> dict[str, str]:
    env = {
        "KUBECONFIG": str(kube.kubeconfig),
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
    # The restart seal's key Secret, as a running cluster has it (the operator's first
    # start creates it; the e2e tests cover that). Seeded in the emulator's store, not
    # through the API: tests that count or fail Secret requests see the operator's only.
    kube.ensure_namespace("m2m-token-operator")
    with contextlib.suppress(Exception):  # made by a previous operator_env of this emulator
        kube.call(
            kube.server.emulator.create,
            "v1/secrets",
            "m2m-token-operator",
            {
                "metadata": {"name": "m2m-token-operator-seal-key"},
                "data": {"key": base64.b64encode(b"integration-seal-key-32-bytes!!!").decode()},
            },
        )
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
