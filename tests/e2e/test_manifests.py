"""`manifests/` installs cleanly on a real API server, the way docs/install.md says.

The kustomization is rendered by the pinned kubectl's kustomize and every
object is validated by the API server (server-side dry run: schema, admission,
Pod Security labels of the namespace), and the documented single-pass install
is run on a fresh control plane. The harness (`devenv.install`) installs the same
files; its names must match the shipped Deployment's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from devenv.controlplane import Cluster, ControlPlane
from devenv.install import (
    MANIFESTS_DIR,
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    PEERING_NAME,
    SKIPPED_KINDS,
    installable_objects,
)
from devenv.operatorprocess import Identity, OperatorProcess
from devenv.tokenserver import DEFAULT_ISSUER, TokenServer

from ._support import CLUSTER_NAME, OPERATOR_CLIENT_ID, OPERATOR_CLIENT_SECRET, kubectl

# docs/install.md, "Check that both replicas joined" (and the chart's NOTES.txt).
JOINED_TEMPLATE = (
    "-o",
    "go-template={{range $id, $peer := .status}}{{$id}} priority={{$peer.priority}}"
    ' lastseen={{$peer.lastseen}}{{"\\n"}}{{end}}',
)

EXPECTED_KINDS = {
    "CustomResourceDefinition",
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "Deployment",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "Service",
}


def _render(cluster: Cluster) -> tuple[str, list[dict[str, Any]]]:
    rendered = kubectl(cluster, "kustomize", str(MANIFESTS_DIR))
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout, [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def _named(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kustomization_renders(control_plane: Cluster) -> None:
    _, documents = _render(control_plane)

    assert {doc["kind"] for doc in documents} == EXPECTED_KINDS
    for doc in documents:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "m2m-token-operator"
    # What the harness installs is what kustomize renders, minus the Pod-related kinds.
    rendered = {(d["kind"], d["metadata"]["name"]) for d in documents}
    installed = {(d["kind"], d["metadata"]["name"]) for d in installable_objects()}
    assert installed == {key for key in rendered if key[0] not in SKIPPED_KINDS}

    # The harness's names are the Deployment's.
    deployment = _named(documents, "Deployment", "m2m-token-operator")
    assert deployment["metadata"]["namespace"] == OPERATOR_NAMESPACE
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == OPERATOR_SERVICE_ACCOUNT
    [container] = pod["containers"]
    assert f"--peering={PEERING_NAME}" in container["args"]
    assert "--standalone" not in container["args"]
    # The operator creates its peering object itself (one-pass installs).
    assert not [d for d in documents if d["kind"] == "ClusterKopfPeering"]
    binding = _named(documents, "ClusterRoleBinding", "m2m-token-operator")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": OPERATOR_SERVICE_ACCOUNT,
            "namespace": OPERATOR_NAMESPACE,
        }
    ]


@pytest.mark.usefixtures("operator_installed")
def test_every_object_passes_server_side_dry_run(control_plane: Cluster) -> None:
    # The CRDs and the namespace exist (operator_installed), so the namespaced
    # objects can be validated too.
    text, documents = _render(control_plane)
    result = kubectl(
        control_plane, "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=text
    )

    assert result.returncode == 0, result.stderr
    # No warning at all: no deprecated API, no Pod Security violation of the
    # `restricted` level the namespace enforces.
    assert "Warning" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(documents)
    assert all(line.endswith("(server dry run)") for line in lines), result.stdout


@pytest.mark.skipif(
    os.environ.get("M2M_E2E_EXISTING_CLUSTER") == "1",
    reason="needs a fresh control plane of its own",
)
def test_documented_install_on_a_fresh_cluster(token_server: TokenServer, tmp_path: Path) -> None:
    """docs/install.md, "Install with kustomize": one pass, then the operator creates its peering.

    The first `kubectl apply -k` used to fail on a fresh cluster (`no matches for
    kind "ClusterKopfPeering"`: the object was mapped before its CRD, created by the
    same command, was served). Now nothing of a new kind ships beside its CRD, and a
    replica started with the shipped --peering creates the object it waits for.
    """
    with ControlPlane() as fresh:
        apply = ("apply", "--server-side", "-k", str(MANIFESTS_DIR))
        first = kubectl(fresh, *apply)
        assert first.returncode == 0, first.stderr
        assert "Warning" not in first.stderr, first.stderr
        absent = kubectl(fresh, "get", "clusterkopfpeering", PEERING_NAME, "-o", "name")
        assert absent.returncode != 0
        assert "NotFound" in absent.stderr, absent.stderr

        # A replica as the Deployment runs it: cluster-wide, the shipped peering, as the
        # shipped ServiceAccount (whose RBAC must allow creating the peering object).
        kubeconfig = fresh.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)
        replica = OperatorProcess(
            kubeconfig=kubeconfig,
            log_file=tmp_path / "operator.log",
            identity=Identity(
                client_id=OPERATOR_CLIENT_ID,
                client_secret=OPERATOR_CLIENT_SECRET,
                token_endpoint=token_server.token_endpoint(DEFAULT_ISSUER),
            ),
            cluster_name=CLUSTER_NAME,
            args=["--all-namespaces", f"--peering={PEERING_NAME}"],
            settings={"POD_ID": "replica-a"},
        )
        with replica:
            replica.wait_for_log(f"Created the ClusterKopfPeering {PEERING_NAME}", timeout=30)
            peering = kubectl(fresh, "get", "clusterkopfpeering", PEERING_NAME, "-o", "name")
            assert peering.stdout.strip() == f"clusterkopfpeering.kopf.dev/{PEERING_NAME}"
            # Kopf joined it: the replica's keep-alive is in the object's status.
            replica.wait_for_log("Refreshes active", timeout=30)
            # docs/install.md's check that the replicas joined: one line per replica.
            joined = kubectl(fresh, "get", "clusterkopfpeering", PEERING_NAME, *JOINED_TEMPLATE)
            assert joined.returncode == 0, joined.stderr
            assert joined.stdout.startswith("replica-a priority="), joined.stdout
            assert len(joined.stdout.splitlines()) == 1
        # Upgrades need a single pass too.
        again = kubectl(fresh, *apply)
        assert again.returncode == 0, again.stderr
