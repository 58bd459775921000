"""Fixtures for end-to-end tests: a real control plane and a real token server.

Both are session-scoped because starting them costs seconds (a control plane
about 3 s once its binaries are built, the token server about 2 s) and tests
isolate themselves by namespace and by client id instead. Every test in this
directory is marked `e2e`, so `pytest -m "not e2e"` leaves them out.

The operator itself runs as a child process (`operator`, `start_operator`),
with the shipped CRD and RBAC installed from `manifests/` and the kubeconfig of
its ServiceAccount, never the admin's: a missing or excessive permission in
the manifests then fails a test.

Environment:

- `M2M_E2E_EXISTING_CLUSTER=1`: use the cluster of `$KUBECONFIG` (first entry,
  else ~/.kube/config) instead of starting one; the token server still runs here.
- `M2M_E2E_LOG_DIR=<dir>`: keep the components' logs there instead of
  discarding them with the run (the operator's: `<dir>/operator/<test>/`).
- `M2M_E2E_AUDIT_LOG=<file>`: the apiserver's audit log of every request the
  operator's ServiceAccount makes (JSON lines), to see which RBAC verbs it uses.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from devenv.controlplane import (
    SERVICE_ACCOUNT_ISSUER,
    Cluster,
    ControlPlane,
    ExistingCluster,
    service_account_jwks,
)
from devenv.install import OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, install_operator
from devenv.operatorprocess import Identity, OperatorProcess
from devenv.tokenserver import DEFAULT_ISSUER, TokenServer

from ._support import (
    ALL_NAMESPACES,
    CLUSTER_NAME,
    GROUP,
    OPERATOR_CLIENT_ID,
    OPERATOR_CLIENT_SECRET,
    PLURAL,
    VERSION,
    Kube,
    NamespaceFactory,
    OperatorFactory,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def _log_dir(component: str) -> Path | None:
    configured = os.environ.get("M2M_E2E_LOG_DIR")
    return Path(configured) / component if configured else None


def _existing_kubeconfig() -> Path:
    configured = os.environ.get("KUBECONFIG", "")
    first = next((entry for entry in configured.split(os.pathsep) if entry), None)
    return Path(first).expanduser() if first else Path.home() / ".kube" / "config"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The cluster under test: `.kubeconfig` (admin), `.api_client()`, SA kubeconfigs."""
    if os.environ.get("M2M_E2E_EXISTING_CLUSTER") == "1":
        existing = ExistingCluster(_existing_kubeconfig())
        try:
            yield existing
        finally:
            existing.close()
        return
    # As on most production clusters: setting blockOwnerDeletion in an owner
    # reference (the operator's Secrets do) then needs `update` on the owner's
    # finalizers, so the shipped RBAC is checked for it.
    apiserver_args = ["--enable-admission-plugins=OwnerReferencesPermissionEnforcement"]
    audit_log = os.environ.get("M2M_E2E_AUDIT_LOG")
    if audit_log:
        apiserver_args += _audit_args(Path(audit_log), tmp_path_factory.mktemp("audit"))
    with ControlPlane(
        log_dir=_log_dir("controlplane"), extra_apiserver_args=apiserver_args
    ) as local:
        yield local


_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    users: ["system:serviceaccount:m2m-token-operator:m2m-token-operator"]
  - level: None
"""


def _audit_args(log_path: Path, directory: Path) -> list[str]:
    """Audit every request of the operator's ServiceAccount (which verbs does it use?)."""
    policy = directory / "audit-policy.yaml"
    policy.write_text(_AUDIT_POLICY)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return [f"--audit-policy-file={policy}", f"--audit-log-path={log_path}"]


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    """mock-oauth2-server: issuer `default` (3600 s tokens) and `short` (20 s tokens)."""
    with TokenServer(log_dir=_log_dir("tokenserver")) as server:
        yield server


@pytest.fixture
def federation(control_plane: Cluster, token_server: TokenServer) -> TokenServer:
    """The token server, trusting this cluster's ServiceAccount tokens for federation.

    `federation.register_federated(client_id, "system:serviceaccount:<ns>:<name>")`
    then makes the token front accept that ServiceAccount's tokens (audience
    `api://AzureADTokenExchange`) as `client_id`'s client assertion, verified
    against the API server's own `/openid/v1/jwks`.
    """

    def jwks() -> dict[str, Any]:
        with control_plane.api_client() as api:
            return service_account_jwks(api)

    token_server.trust_issuer(SERVICE_ACCOUNT_ISSUER, jwks)
    return token_server


@pytest.fixture
def admin_api(control_plane: Cluster) -> Iterator[k8s.ApiClient]:
    """An admin ApiClient for one test, closed after it."""
    with control_plane.api_client() as api:
        yield api


@pytest.fixture
def new_namespace(admin_api: k8s.ApiClient) -> Iterator[NamespaceFactory]:
    """Makes fresh namespaces for one test; deletes them after it (without waiting).

    Their TokenRequests are deleted first, at once: the next test's operator
    (all namespaces) must not find any in a namespace that is still terminating
    and fail to write their Secrets there.
    """
    core = k8s.CoreV1Api(admin_api)
    custom = k8s.CustomObjectsApi(admin_api)
    made: list[str] = []

    def make() -> str:
        name = f"e2e-{uuid.uuid4().hex[:10]}"
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            # 404: the CRD is not installed (a test that did not need it).
            with contextlib.suppress(k8s.ApiException):
                custom.delete_collection_namespaced_custom_object(GROUP, VERSION, name, PLURAL)
            core.delete_namespace(name)


@pytest.fixture
def kube(admin_api: k8s.ApiClient) -> Kube:
    """The admin's helpers for TokenRequests, Secrets and Events."""
    return Kube(admin_api)


@pytest.fixture
def namespace(new_namespace: NamespaceFactory) -> str:
    """A fresh namespace for one test, deleted after it (without waiting for it to go)."""
    return new_namespace()


# --- the operator ------------------------------------------------------------------


@pytest.fixture(scope="session")
def operator_installed(control_plane: Cluster) -> None:
    """The shipped CRDs, namespace, ServiceAccount, RBAC and peering (not the Deployment)."""
    with control_plane.api_client() as api:
        install_operator(api)


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane: Cluster, operator_installed: None) -> Path:
    """A kubeconfig of the operator's ServiceAccount: exactly the rights manifests/ grants."""
    return control_plane.service_account_kubeconfig(
        OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, expiration_seconds=4 * 3600
    )


def _operator_log_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    configured = os.environ.get("M2M_E2E_LOG_DIR")
    if not configured:
        return tmp_path
    test_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    return Path(configured) / "operator" / test_name


@pytest.fixture
def start_operator(
    operator_kubeconfig: Path,
    token_server: TokenServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Iterator[OperatorFactory]:
    """Starts `python -m m2m_token_operator` processes; stops every one after the test.

    Each gets the operator identity at the token server's `issuer`, the
    ServiceAccount kubeconfig, text logs at debug level (`--verbose`) in its own
    file, and settings a local run needs (http to 127.0.0.1:<port> allowed).
    """
    log_dir = _operator_log_dir(request, tmp_path)
    started: list[OperatorProcess] = []

    def start_one(
        *,
        issuer: str = DEFAULT_ISSUER,
        args: Sequence[str] = ("--standalone",),
        settings: Mapping[str, str] | None = None,
        name: str = "operator",
        start: bool = True,
    ) -> OperatorProcess:
        process = OperatorProcess(
            kubeconfig=operator_kubeconfig,
            log_file=log_dir / f"{name}.log",
            identity=Identity(
                client_id=OPERATOR_CLIENT_ID,
                client_secret=OPERATOR_CLIENT_SECRET,
                token_endpoint=token_server.token_endpoint(issuer),
            ),
            cluster_name=CLUSTER_NAME,
            args=[*args, "--verbose"],
            settings={
                "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
                "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": f"127.0.0.1:{token_server.port}",
                # Every namespace may use the operator's own identity (the label every
                # namespace carries); tests of the opt-in pass a narrower selector.
                "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": ALL_NAMESPACES,
                **(settings or {}),
            },
            name=name,
        )
        started.append(process)
        if start:
            process.start()
        return process

    try:
        yield start_one
    finally:
        for process in started:
            process.stop()
        for process in started:
            # Shown by pytest only when the test fails.
            print(f"--- {process.name} log ({process.log_file}), last part:")
            print(process.log_tail(20000))


@pytest.fixture
def operator(start_operator: OperatorFactory) -> OperatorProcess:
    """One operator, standalone, all namespaces, identity at the `default` issuer (1 h tokens)."""
    return start_operator()
