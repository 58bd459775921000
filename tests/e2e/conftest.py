"""Fixtures for end-to-end tests: a real control plane and a real token server.

Both are session-scoped because starting them costs seconds (a control plane
about 3 s once its binaries are built, the token server about 2 s) and tests
isolate themselves by namespace and by client id instead. Every test in this
directory is marked `e2e`, so `pytest -m "not e2e"` leaves them out.

Environment:

- `M2M_E2E_EXISTING_CLUSTER=1`: use the cluster of `$KUBECONFIG` (first entry,
  else ~/.kube/config) instead of starting one; the token server still runs here.
- `M2M_E2E_LOG_DIR=<dir>`: keep the components' logs there instead of
  discarding them with the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from devenv.controlplane import Cluster, ControlPlane, ExistingCluster
from devenv.tokenserver import TokenServer
from kubernetes import client as k8s


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
def control_plane() -> Iterator[Cluster]:
    """The cluster under test: `.kubeconfig` (admin), `.api_client()`, SA kubeconfigs."""
    if os.environ.get("M2M_E2E_EXISTING_CLUSTER") == "1":
        existing = ExistingCluster(_existing_kubeconfig())
        try:
            yield existing
        finally:
            existing.close()
        return
    with ControlPlane(log_dir=_log_dir("controlplane")) as local:
        yield local


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    """mock-oauth2-server: issuer `default` (3600 s tokens) and `short` (20 s tokens)."""
    with TokenServer(log_dir=_log_dir("tokenserver")) as server:
        yield server


@pytest.fixture
def admin_api(control_plane: Cluster) -> Iterator[k8s.ApiClient]:
    """An admin ApiClient for one test, closed after it."""
    with control_plane.api_client() as api:
        yield api


@pytest.fixture
def namespace(admin_api: k8s.ApiClient) -> Iterator[str]:
    """A fresh namespace for one test, deleted after it (without waiting for it to go)."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    core = k8s.CoreV1Api(admin_api)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)
