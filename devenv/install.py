"""Install the operator's API and identity into a cluster from the shipped manifests.

The e2e tests and the demo must exercise the RBAC and the CRD that users get,
not a copy that drifts from them. So this reads the very files `kubectl apply
-k manifests/` reads (the kustomization's `resources`, followed into `crds/`),
and server-side applies them through the API: CRDs first (then waits until they
are Established), the namespace, the ServiceAccount, the ClusterRole and its
binding, and the admission policy that limits what the operator's account may
write (then waits until the API server enforces it); the Kopf peering object is
the operator's to create, at start. What needs Pods (the Deployment, its
PodDisruptionBudget, NetworkPolicy and Service) is skipped: there are no nodes
here; the operator runs as a local process with the ServiceAccount's token.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import dynamic
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from devenv.controlplane import request_service_account_token

__all__ = [
    "ADMISSION_POLICY",
    "CRD_FILE",
    "FIELD_MANAGER",
    "MANIFESTS_DIR",
    "OPERATOR_NAMESPACE",
    "OPERATOR_SERVICE_ACCOUNT",
    "PEERING_NAME",
    "REPO_ROOT",
    "SKIPPED_KINDS",
    "InstallError",
    "apply_objects",
    "install_operator",
    "installable_objects",
    "kustomization_documents",
    "read_documents",
    "wait_for_admission_policy",
    "wait_for_crds",
    "wait_until_listable",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = REPO_ROOT / "crds" / "tokenrequests.m2m.dev.yaml"
MANIFESTS_DIR = REPO_ROOT / "manifests"
EXAMPLES_DIR = REPO_ROOT / "examples"
# As named in manifests/ (serviceaccount.yaml, rbac.yaml, the Deployment's --peering).
OPERATOR_NAMESPACE = "m2m-token-operator"
OPERATOR_SERVICE_ACCOUNT = "m2m-token-operator"
PEERING_NAME = "m2m-token-operator"
# manifests/admission-policy.yaml: what the operator's ServiceAccount may write.
ADMISSION_POLICY = "m2m-token-operator-secret-writes"
FIELD_MANAGER = "m2m-devenv"
# Objects that only matter where Pods run; this control plane has no nodes.
SKIPPED_KINDS = frozenset({"Deployment", "PodDisruptionBudget", "NetworkPolicy", "Service"})

Manifest = dict[str, Any]


class InstallError(RuntimeError):
    """The manifests could not be applied; the message names the object and the answer."""


def read_documents(path: Path) -> list[Manifest]:
    """Every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def _resource_files(directory: Path) -> Iterator[Path]:
    kustomization = read_documents(directory / "kustomization.yaml")[0]
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            yield from _resource_files(path)
        else:
            yield path


def kustomization_documents(directory: Path = MANIFESTS_DIR) -> list[Manifest]:
    """The objects of a kustomization's `resources`, in its order, without its transformers.

    The labels kustomize adds (`app.kubernetes.io/part-of`, `.../version`) are
    left out: they change no behaviour, and test 9 (`kubectl kustomize`) covers
    the rendered form.
    """
    return [doc for path in _resource_files(directory) for doc in read_documents(path)]


def installable_objects(directory: Path = MANIFESTS_DIR) -> list[Manifest]:
    """What a local process-based install needs: everything but the Pod-related objects."""
    return [doc for doc in kustomization_documents(directory) if doc["kind"] not in SKIPPED_KINDS]


def _describe(manifest: Manifest) -> str:
    metadata = manifest.get("metadata", {})
    where = f"{metadata['namespace']}/" if metadata.get("namespace") else ""
    return f"{manifest['kind']} {where}{metadata.get('name')}"


def _resource(client: dynamic.DynamicClient, api_version: str, kind: str, timeout: float) -> Any:
    # A CRD that has just become Established may take a moment to show in discovery.
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            if time.monotonic() > deadline:
                raise InstallError(f"{api_version} {kind} is not served by the API") from None
            client.resources.invalidate_cache()
            time.sleep(0.2)


def apply_objects(
    api: k8s.ApiClient,
    objects: Iterable[Manifest],
    *,
    dry_run: bool = False,
    timeout: float = 30.0,
) -> list[Manifest]:
    """Server-side apply each object (as `kubectl apply --server-side --force-conflicts`)."""
    client = dynamic.DynamicClient(api)  # type: ignore[no-untyped-call]
    applied: list[Manifest] = []
    for manifest in objects:
        resource = _resource(client, manifest["apiVersion"], manifest["kind"], timeout)
        try:
            result = client.server_side_apply(  # type: ignore[no-untyped-call]
                resource,
                body=manifest,
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
                dry_run="All" if dry_run else None,
            )
        except k8s.ApiException as error:
            raise InstallError(
                f"applying {_describe(manifest)} failed: HTTP {error.status} {error.body}"
            ) from None
        applied.append(result.to_dict())
    return applied


def wait_for_crds(api: k8s.ApiClient, names: Iterable[str], *, timeout: float = 60.0) -> None:
    """Wait until every named CRD has the condition Established=True."""
    extensions = k8s.ApiextensionsV1Api(api)
    pending = set(names)
    deadline = time.monotonic() + timeout
    while pending:
        for name in sorted(pending):
            crd = extensions.read_custom_resource_definition(name)
            conditions = (crd.status.conditions if crd.status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                pending.discard(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise InstallError(f"CRDs not Established within {timeout}s: {sorted(pending)}")
        time.sleep(0.1)


def wait_until_listable(
    api: k8s.ApiClient, crds: Iterable[Manifest], *, timeout: float = 60.0
) -> None:
    """Wait until each CRD's resource can be listed.

    Established is not quite served: for a moment after it the apiserver answers
    429 "storage is (re)initializing", which an operator started then logs as an
    error (Kopf retries it). Waiting here keeps that out of the logs under test.
    """
    custom = k8s.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    for crd in crds:
        spec = crd["spec"]
        version = next(v["name"] for v in spec["versions"] if v.get("served", True))
        plural = spec["names"]["plural"]
        while True:
            try:
                custom.list_cluster_custom_object(spec["group"], version, plural, limit=1)
                break
            except k8s.ApiException as error:
                if error.status != 429 or time.monotonic() > deadline:
                    raise InstallError(
                        f"cannot list {plural}.{spec['group']}: HTTP {error.status} {error.reason}"
                    ) from None
                time.sleep(0.2)


def service_account_client(api: k8s.ApiClient, namespace: str, name: str) -> k8s.ApiClient:
    """A client of the same API server as `api`, acting as a ServiceAccount (10-minute token)."""
    token = request_service_account_token(api, namespace, name, expiration_seconds=600)
    configuration = copy.deepcopy(api.configuration)
    configuration.cert_file = None
    configuration.key_file = None
    configuration.username = ""
    configuration.password = ""
    configuration.api_key = {"authorization": f"Bearer {token}"}
    configuration.api_key_prefix = {}
    return k8s.ApiClient(configuration)


def wait_for_admission_policy(api: k8s.ApiClient, *, timeout: float = 60.0) -> None:
    """Wait until the API server denies what the admission policy forbids the operator.

    A new ValidatingAdmissionPolicy takes effect once the API server's informer has
    both it and its binding, a moment after the apply; tests that run before then
    would prove nothing about it. The probe: a server-side dry run, as the operator's
    ServiceAccount, of a Secret it may not create (dry runs go through admission and
    store nothing).
    """
    probe: Any = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": "m2m-admission-policy-probe", "namespace": OPERATOR_NAMESPACE},
    }
    deadline = time.monotonic() + timeout
    with service_account_client(api, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT) as operator:
        core = k8s.CoreV1Api(operator)
        while True:
            try:
                core.create_namespaced_secret(OPERATOR_NAMESPACE, probe, dry_run="All")
            except k8s.ApiException as error:
                if error.status == 403 and ADMISSION_POLICY in str(error.body):
                    return
                raise InstallError(
                    f"probing the admission policy: HTTP {error.status} {error.body}"
                ) from None
            if time.monotonic() > deadline:
                raise InstallError(f"{ADMISSION_POLICY} not enforced within {timeout}s")
            time.sleep(0.1)  # the create passed: the policy is not enforced yet


def install_operator(
    api: k8s.ApiClient, *, objects: list[Manifest] | None = None, timeout: float = 60.0
) -> list[Manifest]:
    """Apply the shipped CRDs, namespace, ServiceAccount, RBAC and admission policy (or
    `objects`, e.g. a rendered overlay's, without the Pod-related kinds); idempotent.

    Returns what was applied, as the server answered.
    """
    objects = installable_objects() if objects is None else objects
    if not any(doc["kind"] == "CustomResourceDefinition" for doc in objects):
        raise InstallError(f"{MANIFESTS_DIR}/kustomization.yaml installs no CRD")
    crds = [doc for doc in objects if doc["kind"] == "CustomResourceDefinition"]
    namespaces = [doc for doc in objects if doc["kind"] == "Namespace"]
    rest = [doc for doc in objects if doc not in crds and doc not in namespaces]
    applied = apply_objects(api, crds, timeout=timeout)
    wait_for_crds(api, (doc["metadata"]["name"] for doc in crds), timeout=timeout)
    wait_until_listable(api, crds, timeout=timeout)
    # Custom objects, should the manifests ever ship one, only after their CRD is served.
    applied += apply_objects(api, [*namespaces, *rest], timeout=timeout)
    if any(doc["kind"] == "ValidatingAdmissionPolicyBinding" for doc in objects):
        wait_for_admission_policy(api, timeout=timeout)
    return applied
