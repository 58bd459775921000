"""`make demo`: the operator at work on this machine, from nothing, in seconds.

It builds (once) or reuses the control-plane binaries, starts a real
kube-apiserver with etcd and the controller manager, a real OAuth 2.0 token
server (mock-oauth2-server), installs the CRD and the operator's RBAC from
`manifests/`, and runs the operator as a local process with its
ServiceAccount's token, standalone, serving all namespaces. Then it applies the
TokenRequests of `examples/` (the credentials Secret example pointed at the
local token server), waits until they are Ready and shows what a user would
look at: `kubectl get tokreq`, the Secret's keys (the token itself redacted)
and the token's non-secret claims. It keeps running until Ctrl-C, so that the
cluster can be explored; `--exit` stops after showing (for CI).

Everything listens on 127.0.0.1 and is stopped on exit; logs stay in the
directory printed at the start.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, cast

from kubernetes import client as k8s

from devenv.binaries import BuildError, ensure_binaries
from devenv.cache import cache_dir
from devenv.controlplane import (
    SERVICE_ACCOUNT_ISSUER,
    ControlPlane,
    ControlPlaneError,
    service_account_jwks,
)
from devenv.install import (
    EXAMPLES_DIR,
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    InstallError,
    apply_objects,
    install_operator,
    read_documents,
)
from devenv.jwk import new_application_jwk
from devenv.operatorprocess import Identity, OperatorError, OperatorProcess
from devenv.tokenfront import JwksSource
from devenv.tokenserver import TokenServer, TokenServerError, ensure_classpath, jwt_claims

CLUSTER_NAME = "local"
OPERATOR_CLIENT_ID = "m2m-demo-operator"
DEMO_NAMESPACE = "demo"
# The examples' TokenRequests, in the order they are applied; all in namespace `demo`.
EXAMPLE_FILES = (
    "tokenrequest-target.yaml",
    "tokenrequest-scope.yaml",
    "credentials-secret.yaml",
    "tokenrequest-credentials.yaml",
    "credentials-secret-jwk.yaml",
    "tokenrequest-private-key-jwt.yaml",
    "federation-rolebinding.yaml",
)
# The application of the federation example: its own client id in the demo.
FEDERATED_CLIENT_ID = "33333333-3333-3333-3333-333333333333"
# Who may use the operator's own identity: only the demo namespace.
OPERATOR_IDENTITY_SELECTOR = f"kubernetes.io/metadata.name in ({DEMO_NAMESPACE})"
CLAIMS_SHOWN = ("aud", "iss", "sub", "iat", "exp")
READY_TIMEOUT = 60.0
GROUP, VERSION, PLURAL = "m2m.dev", "v1alpha1", "tokenrequests"


class DemoError(RuntimeError):
    pass


class _Stopped(Exception):
    """SIGTERM: shut down as on Ctrl-C."""


def _stop_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise _Stopped


class Console:
    """Numbered steps with their durations, on stdout."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.number = 0
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.number += 1
        print(f"[{self.number}/{self.steps}] {title} ...", flush=True)
        began = time.monotonic()
        yield
        print(f"      done in {time.monotonic() - began:.1f}s", flush=True)

    def note(self, text: str) -> None:
        print(f"      {text}", flush=True)

    @staticmethod
    def section(title: str) -> None:
        print(f"\n=== {title}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _redact(token: str) -> str:
    return f"{token[:10]}...[redacted, {len(token)} characters]"


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _example_objects(
    token_server: TokenServer, service_account_jwks: JwksSource
) -> list[dict[str, Any]]:
    """The examples as shipped, pointed at the local token endpoint, with real key material.

    The JWK Secret gets a freshly generated private key whose public half the local
    endpoint verifies assertions with; the ServiceAccount gets the local endpoint and
    its own client id, which the endpoint trusts for this cluster's ServiceAccount
    tokens (verified against the API server's JWKS), as Entra ID trusts a federated
    credential.
    """
    objects: list[dict[str, Any]] = []
    for file_name in EXAMPLE_FILES:
        for document in read_documents(EXAMPLES_DIR / file_name):
            metadata = document["metadata"]
            if document["kind"] == "Secret":
                data = document.setdefault("stringData", {})
                data["AZURE_OPENID_CONFIG_TOKEN_ENDPOINT"] = token_server.token_endpoint()
                if "AZURE_APP_JWK" in data:
                    private, public = new_application_jwk("shop-frontend")
                    data["AZURE_APP_JWK"] = json.dumps(private)
                    token_server.register_jwk(data["AZURE_APP_CLIENT_ID"], public)
                else:
                    # The example's placeholder would work too (any non-empty secret
                    # does here); a random one shows that it never surfaces anywhere.
                    data["AZURE_APP_CLIENT_SECRET"] = secrets.token_urlsafe(24)
            elif document["kind"] == "ServiceAccount":
                annotations = metadata.setdefault("annotations", {})
                annotations["azure.workload.identity/client-id"] = FEDERATED_CLIENT_ID
                annotations["m2m.dev/token-endpoint"] = token_server.token_endpoint()
                subject = f"system:serviceaccount:{metadata['namespace']}:{metadata['name']}"
                token_server.register_federated(
                    FEDERATED_CLIENT_ID,
                    subject,
                    issuer=SERVICE_ACCOUNT_ISSUER,
                    jwks=service_account_jwks,
                )
            objects.append(document)
    return objects


def _token_request(custom: k8s.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return cast(dict[str, Any], body)


def _wait_ready(
    api: k8s.ApiClient, names: list[tuple[str, str]], operator: OperatorProcess
) -> None:
    custom = k8s.CustomObjectsApi(api)
    pending = set(names)
    deadline = time.monotonic() + READY_TIMEOUT
    while pending:
        for namespace, name in sorted(pending):
            body = _token_request(custom, namespace, name)
            conditions = (body.get("status") or {}).get("conditions") or []
            ready: dict[str, Any] = next((c for c in conditions if c.get("type") == "Ready"), {})
            if ready.get("status") == "True":
                pending.discard((namespace, name))
            elif ready.get("status") == "False" and ready.get("reason") != "Pending":
                raise DemoError(
                    f"TokenRequest {namespace}/{name} is not Ready: {ready.get('reason')}:"
                    f" {ready.get('message')}\n(operator log: {operator.log_file})"
                )
        if not pending:
            return
        if not operator.running:
            raise DemoError(f"the operator exited; its log: {operator.log_file}")
        if time.monotonic() > deadline:
            raise DemoError(
                f"not Ready within {READY_TIMEOUT:.0f}s: {sorted(pending)}"
                f" (operator log: {operator.log_file})"
            )
        time.sleep(0.2)


def _kubectl(cluster: ControlPlane, *args: str) -> str:
    result = cluster.kubectl(*args, check=False)
    return result.stdout + result.stderr


def _show(cluster: ControlPlane, api: k8s.ApiClient, token_requests: list[tuple[str, str]]) -> None:
    Console.section("kubectl get tokreq -A")
    print(_kubectl(cluster, "get", "tokreq", "-A"), end="")
    Console.section("kubectl get tokreq -A -o wide")
    print(_kubectl(cluster, "get", "tokreq", "-A", "-o", "wide"), end="")

    core = k8s.CoreV1Api(api)
    custom = k8s.CustomObjectsApi(api)
    for namespace, name in token_requests:
        secret_name = _token_request(custom, namespace, name)["status"]["secretName"]
        secret = core.read_namespaced_secret(secret_name, namespace)
        data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        metadata = secret.metadata or k8s.V1ObjectMeta()
        Console.section(f"Secret {namespace}/{secret_name} (from TokenRequest {name})")
        print(f"  labels:      {metadata.labels}")
        print(f"  annotations: {metadata.annotations}")
        for owner in metadata.owner_references or []:
            print(f"  owner:       {owner.kind}/{owner.name} (controller={owner.controller})")
        for key in sorted(data):
            shown_value = _redact(data[key]) if key == "token" else data[key]
            print(f"  data.{key:<11} {shown_value}")
        claims = jwt_claims(data["token"])
        print("  token claims (not secret):")
        for claim in CLAIMS_SHOWN:
            value = claims.get(claim)
            shown = f"{value} ({_when(int(value or 0))})" if claim in ("iat", "exp") else value
            print(f"    {claim:<4} {shown}")


def _plugin_status(cluster: ControlPlane, namespace: str, name: str) -> None:
    """`kubectl m2m status` for one TokenRequest, as a user would run it."""
    Console.section(f"kubectl m2m status {name} -n {namespace}")
    plugin = Path(sys.executable).parent / "kubectl-m2m"
    result = subprocess.run(
        [str(plugin), "status", name, "-n", namespace, f"--kubeconfig={cluster.kubeconfig}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    print(result.stdout + result.stderr, end="")


def _explore_hints(cluster: ControlPlane, operator: OperatorProcess, work_dir: Path) -> None:
    Console.section("Explore (while this runs)")
    kubectl = cluster.binaries.kubectl
    print(f"  export KUBECONFIG={cluster.kubeconfig}")
    print(f"  {kubectl} get tokreq -A -w")
    print(f"  {kubectl} -n demo describe tokreq orders-api")
    print(f"  {Path(sys.executable).parent / 'kubectl-m2m'} status orders-api -n demo")
    print(f"  {kubectl} -n demo get events")
    print(f"  tail -f {operator.log_file}")
    print(f"  logs of every component: {work_dir}")


def run(*, exit_after_showing: bool, work_dir: Path) -> int:
    console = Console(steps=7)
    print(f"m2m-token-operator demo; logs in {work_dir}\n", flush=True)

    with console.step("Control-plane binaries (built once, then cached)"):
        binaries = ensure_binaries(log=console.note)
        console.note(f"kubectl: {binaries.kubectl}")
    with console.step("Token server jars (fetched once, then cached)"):
        ensure_classpath(log=console.note)

    with contextlib.ExitStack() as stack:
        with console.step("Starting etcd, kube-apiserver and kube-controller-manager"):
            cluster = stack.enter_context(
                ControlPlane(binaries=binaries, log_dir=work_dir / "controlplane")
            )
            console.note(f"API server {cluster.server}")
        with console.step("Starting the token server (mock-oauth2-server)"):
            token_server = stack.enter_context(TokenServer(log_dir=work_dir / "tokenserver"))
            console.note(f"token endpoint {token_server.token_endpoint()}")
        api = stack.enter_context(cluster.api_client())

        with console.step("Installing the CRD, namespace, ServiceAccount and RBAC from manifests/"):
            applied = install_operator(api)
            for manifest in applied:
                metadata = manifest["metadata"]
                where = f"{metadata['namespace']}/" if metadata.get("namespace") else ""
                console.note(f"{manifest['kind']} {where}{metadata['name']}")

        operator = OperatorProcess(
            kubeconfig=cluster.service_account_kubeconfig(
                OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, expiration_seconds=24 * 3600
            ),
            log_file=work_dir / "operator.log",
            identity=Identity(
                client_id=OPERATOR_CLIENT_ID,
                client_secret=secrets.token_urlsafe(24),
                token_endpoint=token_server.token_endpoint(),
            ),
            cluster_name=CLUSTER_NAME,
            args=["--standalone"],
            settings={
                # The local token server speaks http on 127.0.0.1: allowed here only.
                "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
                "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": f"127.0.0.1:{token_server.port}",
                # The examples without spec.credentials use the operator's own identity:
                # an administrator's grant, here to the demo namespace only.
                "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": OPERATOR_IDENTITY_SELECTOR,
            },
        )
        with console.step("Starting the operator as its ServiceAccount"):
            operator.start()
            stack.callback(operator.stop)
            console.note(
                f"pid {operator.pid}, M2M_CLUSTER_NAME={CLUSTER_NAME}, all namespaces;"
                f" log: {operator.log_file}"
            )
            console.note(
                "its own identity only for namespaces matching"
                f" M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR={OPERATOR_IDENTITY_SELECTOR!r}"
            )

        with console.step("Applying examples/ and waiting until the TokenRequests are Ready"):
            core = k8s.CoreV1Api(api)
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=DEMO_NAMESPACE)))

            def jwks() -> dict[str, Any]:
                with cluster.api_client() as jwks_api:
                    return service_account_jwks(jwks_api)

            objects = _example_objects(token_server, jwks)
            apply_objects(api, objects)
            token_requests = []
            for manifest in objects:
                metadata = manifest["metadata"]
                note = ""
                if manifest["kind"] == "Secret":
                    note = " (its token endpoint replaced by the local token server's)"
                console.note(f"{manifest['kind']} {metadata['namespace']}/{metadata['name']}{note}")
                if manifest["kind"] == "TokenRequest":
                    token_requests.append((metadata["namespace"], metadata["name"]))
            _wait_ready(api, token_requests, operator)

        _show(cluster, api, token_requests)
        if token_requests:
            _plugin_status(cluster, *token_requests[0])
        print(f"\nReady in {console.elapsed():.1f}s.", flush=True)
        if exit_after_showing:
            print("Stopping (--exit).", flush=True)
        else:
            _explore_hints(cluster, operator, work_dir)
            print("\nRunning; Ctrl-C stops everything.", flush=True)
            while operator.running:
                time.sleep(1)
            print(f"The operator exited; see {operator.log_file}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devenv.demo",
        description="Run the operator against a local control plane and token server.",
    )
    parser.add_argument(
        "--exit", action="store_true", help="exit after showing the results (for CI)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=cache_dir() / "demo",
        help="where the logs go (emptied first; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    work_dir: Path = args.work_dir.expanduser().resolve()
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = time.monotonic()
    try:
        code = run(exit_after_showing=args.exit, work_dir=work_dir)
    except (KeyboardInterrupt, _Stopped):
        print("\nStopped; everything is shut down.", flush=True)
        return 130
    except (
        BuildError,
        ControlPlaneError,
        TokenServerError,
        InstallError,
        OperatorError,
        DemoError,
        subprocess.SubprocessError,
        k8s.ApiException,
    ) as error:
        print(f"\ndemo failed: {error}", file=sys.stderr, flush=True)
        print(f"logs: {work_dir}", file=sys.stderr)
        return 1
    print(f"Everything is shut down ({time.monotonic() - started:.1f}s in all).", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
