"""A throwaway real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, controllers.

An emulator answers what it was taught; the operator depends on what only the
real thing does: owner references and the garbage collector that honours them,
RBAC and its 403s, validation and defaulting of the CRD, resource versions and
the TokenRequest subresource for ServiceAccount credentials. This runs the real
binaries (see `devenv.binaries`) as plain processes, with no container runtime,
no nodes and no kubelet: everything an operator talks to, nothing it does not.

Each `ControlPlane` gets its own temporary directory (certificates, etcd data,
kubeconfigs) and free ports, and removes both processes and directory on stop.
`ExistingCluster` gives the same surface over a cluster named by a kubeconfig.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from devenv.binaries import Binaries, ensure_binaries
from devenv.process import ManagedProcess, StartStop

__all__ = [
    "SERVICE_ACCOUNT_ISSUER",
    "Cluster",
    "ControlPlane",
    "ControlPlaneError",
    "ExistingCluster",
    "new_api_client",
    "request_service_account_token",
    "service_account_jwks",
    "write_token_kubeconfig",
]

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# The first address of the service range is the `kubernetes` Service's, which the
# apiserver's certificate must name for in-cluster clients.
_KUBERNETES_SERVICE_IP = "10.0.0.1"
_STOP_TIMEOUT = 10.0
_DIR_PREFIX = "m2m-controlplane-"
_OWNER_FILE = "owner.pid"


class ControlPlaneError(RuntimeError):
    """The control plane could not be started; the message quotes the failing process."""


class Cluster(Protocol):
    """What tests need from a cluster, local or existing."""

    @property
    def kubeconfig(self) -> Path: ...

    def api_client(self) -> k8s.ApiClient: ...

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> Path: ...


# --- certificates -----------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 keys are generated in microseconds where RSA takes tens of
    # milliseconds each, and every component here accepts them.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class _CertificateAuthority:
    def __init__(self) -> None:
        self.key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "m2m-devenv-ca")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        server: bool = False,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if dns_names or ip_addresses:
            names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


# --- kubeconfigs ------------------------------------------------------------------


def _write_kubeconfig(
    path: Path, *, server: str, cluster: dict[str, Any], user: dict[str, Any]
) -> Path:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "m2m-devenv", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "m2m-devenv", "user": user}],
        "contexts": [
            {"name": "m2m-devenv", "context": {"cluster": "m2m-devenv", "user": "m2m-devenv"}}
        ],
        "current-context": "m2m-devenv",
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)
    return path


def request_service_account_token(
    api_client: k8s.ApiClient, namespace: str, name: str, *, expiration_seconds: int = 3600
) -> str:
    """A bound token for the ServiceAccount from the TokenRequest subresource."""
    response = k8s.CoreV1Api(api_client).create_namespaced_service_account_token(
        name,
        namespace,
        k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        ),
    )
    if response.status is None or not response.status.token:
        raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
    return str(response.status.token)


def service_account_jwks(api_client: k8s.ApiClient) -> dict[str, Any]:
    """The keys that sign this cluster's ServiceAccount tokens (`/openid/v1/jwks`).

    What a relying party such as Entra ID fetches (via the issuer's discovery
    document) to verify a federated ServiceAccount token; read here as the client
    given, since the endpoint is not open to anonymous users by default.
    """
    method, url, headers, body, post_params = api_client.param_serialize(
        "GET",
        "/openid/v1/jwks",
        header_params={"Accept": "application/jwk-set+json"},
        auth_settings=["BearerToken"],
    )
    response = api_client.call_api(method, url, headers, body, post_params, _request_timeout=10)
    if response.status != 200:
        raise ControlPlaneError(f"GET /openid/v1/jwks answered HTTP {response.status}")
    jwks: dict[str, Any] = json.loads(response.read())  # type: ignore[no-untyped-call]
    return jwks


def write_token_kubeconfig(api_client: k8s.ApiClient, token: str, path: Path) -> Path:
    """A self-contained kubeconfig for the same server as `api_client`, as `token`."""
    configuration = api_client.configuration
    cluster: dict[str, Any] = {}
    if not configuration.verify_ssl:
        cluster["insecure-skip-tls-verify"] = True
    elif configuration.ssl_ca_cert:
        ca_pem = Path(configuration.ssl_ca_cert).read_bytes()
        cluster["certificate-authority-data"] = _b64(ca_pem)
    return _write_kubeconfig(
        path, server=configuration.host, cluster=cluster, user={"token": token}
    )


def new_api_client(kubeconfig: Path) -> k8s.ApiClient:
    """An ApiClient for a kubeconfig file, leaving the global client configuration alone."""
    api: k8s.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    return api


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- ports and processes ----------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    # All sockets stay open until every port is chosen, so the ports differ.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _child_env() -> dict[str, str]:
    # A clean environment: ETCD_* or KUBECONFIG from the developer's shell would
    # silently reconfigure the components.
    keep = ("PATH", "HOME", "TMPDIR", "LANG", "TZ")
    return {key: os.environ[key] for key in keep if key in os.environ}


def _remove_orphaned_directories() -> None:
    # A harness that was killed could not remove its directory (its processes
    # died with it, see devenv.process); the next one does.
    for directory in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        try:
            owner = int((directory / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{owner}").exists():
            shutil.rmtree(directory, ignore_errors=True)


class _PortTaken(Exception):
    pass


class ControlPlane(StartStop):
    """etcd, kube-apiserver and kube-controller-manager on 127.0.0.1, as a context manager.

    Authentication is by client certificates (the admin is in `system:masters`)
    and ServiceAccount tokens; authorization is `Node,RBAC`; the controller
    manager runs all default controllers, the garbage collector and the
    namespace controller among them.
    """

    def __init__(
        self,
        *,
        binaries: Binaries | None = None,
        startup_timeout: float = 120.0,
        log_dir: Path | None = None,
        controllers: Sequence[str] = ("*",),
        extra_apiserver_args: Sequence[str] = (),
        extra_controller_manager_args: Sequence[str] = (),
    ) -> None:
        self._binaries = binaries
        self.startup_timeout = startup_timeout
        self.log_dir = log_dir
        self.controllers = tuple(controllers)
        self.extra_apiserver_args = tuple(extra_apiserver_args)
        self.extra_controller_manager_args = tuple(extra_controller_manager_args)
        self.startup_seconds: float | None = None
        self._dir: Path | None = None
        self._processes: list[ManagedProcess] = []
        self._serial = 0
        self.server = ""
        self.etcd_url = ""

    # -- paths, valid while running --

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise ControlPlaneError("the control plane is not running")
        return self._dir

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client certificate in `system:masters`)."""
        return self.directory / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.directory / "pki" / "ca.crt"

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            self._binaries = ensure_binaries()
        return self._binaries

    # -- lifecycle --

    def start(self) -> None:
        if self._dir is not None:
            raise ControlPlaneError("control plane already started")
        binaries = self.binaries  # may build them; not part of the start-up time
        started = time.monotonic()
        _remove_orphaned_directories()
        self._dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))
        (self._dir / _OWNER_FILE).write_text(str(os.getpid()))
        try:
            self._write_pki()
            for attempt in range(3):
                try:
                    self._start_processes(binaries)
                    break
                except _PortTaken:
                    self._stop_processes()
                    shutil.rmtree(self.directory / "etcd", ignore_errors=True)
                    if attempt == 2:
                        raise ControlPlaneError("free ports kept being taken; giving up") from None
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop every process (TERM, then KILL) and remove the temporary directory."""
        self._stop_processes()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _stop_processes(self) -> None:
        # All at once: each takes about a second to shut down gracefully, and
        # nothing of this cluster's state needs to survive an orderly goodbye.
        for process in self._processes:
            process.terminate()
        for process in reversed(self._processes):
            process.stop(_STOP_TIMEOUT)
        self._processes = []

    def process_ids(self) -> list[int]:
        """The running etcd and kube-apiserver (for benchmarks that measure their CPU)."""
        return [p.pid for p in self._processes if p.pid is not None]

    # -- clients --

    def api_client(self) -> k8s.ApiClient:
        """A new admin client; the kubeconfig references files, so no temp copies are made."""
        return new_api_client(self.kubeconfig)

    def service_account_token(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> str:
        with self.api_client() as api:
            return request_service_account_token(
                api, namespace, name, expiration_seconds=expiration_seconds
            )

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount `namespace/name`.

        The account must exist; the token comes from the TokenRequest API and is
        valid for `expiration_seconds` (the apiserver's minimum is 600).
        """
        token = self.service_account_token(namespace, name, expiration_seconds=expiration_seconds)
        self._serial += 1
        path = self.directory / f"sa-{namespace}-{name}-{self._serial}.kubeconfig"
        return _write_kubeconfig(
            path,
            server=self.server,
            cluster={"certificate-authority": str(self.ca_file)},
            user={"token": token},
        )

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl as admin against this control plane."""
        return subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            env=_child_env(),
        )

    # -- internals --

    def _write_pki(self) -> None:
        pki = self.directory / "pki"
        pki.mkdir()
        ca = _CertificateAuthority()
        _write_cert(pki / "ca.crt", ca.cert)
        serving_key, serving_cert = ca.issue(
            "kube-apiserver",
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ip_addresses=["127.0.0.1", _KUBERNETES_SERVICE_IP],
            server=True,
        )
        _write_key(pki / "serving.key", serving_key)
        _write_cert(pki / "serving.crt", serving_cert)
        for name, common_name in (
            ("admin", "m2m-devenv-admin"),
            # The controller manager gets full rights rather than the narrow
            # system:kube-controller-manager role, which only suffices together
            # with per-controller ServiceAccount credentials.
            ("controller-manager", "system:kube-controller-manager"),
        ):
            key, cert = ca.issue(common_name, organizations=["system:masters"])
            _write_key(pki / f"{name}.key", key)
            _write_cert(pki / f"{name}.crt", cert)
        _write_key(pki / "service-account.key", _new_key())
        service_account_public = (
            serialization.load_pem_private_key((pki / "service-account.key").read_bytes(), None)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (pki / "service-account.pub").write_bytes(service_account_public)

    def _client_kubeconfig(self, name: str) -> Path:
        pki = self.directory / "pki"
        return _write_kubeconfig(
            self.directory / f"{name}.kubeconfig",
            server=self.server,
            cluster={"certificate-authority": str(pki / "ca.crt")},
            user={
                "client-certificate": str(pki / f"{name}.crt"),
                "client-key": str(pki / f"{name}.key"),
            },
        )

    def _start_processes(self, binaries: Binaries) -> None:
        directory = self.directory
        pki = directory / "pki"
        etcd_client, etcd_peer, apiserver_port, kcm_port = _free_ports(4)
        self.etcd_url = f"http://127.0.0.1:{etcd_client}"
        self.server = f"https://127.0.0.1:{apiserver_port}"
        self._client_kubeconfig("admin")
        kcm_kubeconfig = self._client_kubeconfig("controller-manager")
        deadline = time.monotonic() + self.startup_timeout

        etcd_peer_url = f"http://127.0.0.1:{etcd_peer}"
        etcd = self._spawn(
            "etcd",
            [
                str(binaries.etcd),
                "--name=m2m-devenv",
                f"--data-dir={directory / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={etcd_peer_url}",
                f"--initial-advertise-peer-urls={etcd_peer_url}",
                f"--initial-cluster=m2m-devenv={etcd_peer_url}",
                # A test cluster's data is worthless after the run: skip fsync.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        # The apiserver retries etcd while it starts, so both start together.
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(binaries.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={apiserver_port}",
                f"--tls-cert-file={pki / 'serving.crt'}",
                f"--tls-private-key-file={pki / 'serving.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--cert-dir={directory / 'apiserver-certs'}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'service-account.pub'}",
                f"--service-account-signing-key-file={pki / 'service-account.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # No nodes and no kube-proxy: nothing would read the endpoints.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                *self.extra_apiserver_args,
            ],
        )
        self._wait_until(
            apiserver,
            lambda: self._https_ok("/readyz", cert=True),
            deadline,
            also_watch=(etcd,),
        )
        # The controller manager gives up if the apiserver is not healthy within
        # seconds of its start, so it starts only once the apiserver is ready.
        kcm = self._spawn(
            "kube-controller-manager",
            [
                str(binaries.kube_controller_manager),
                f"--kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--tls-cert-file={pki / 'serving.crt'}",
                f"--tls-private-key-file={pki / 'serving.key'}",
                f"--controllers={','.join(self.controllers)}",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki / 'service-account.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--profiling=false",
                *self.extra_controller_manager_args,
            ],
        )
        self._wait_until(
            kcm,
            lambda: self._https_ok("/healthz", cert=False, port=kcm_port),
            deadline,
            also_watch=(etcd, apiserver),
        )

    def _spawn(self, name: str, command: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, command, env=_child_env(), log_dir=self.log_dir)
        process.start()
        self._processes.append(process)
        return process

    def _https_ok(self, path: str, *, cert: bool, port: int | None = None) -> bool:
        pki = self.directory / "pki"
        base = self.server if port is None else f"https://127.0.0.1:{port}"
        try:
            response = requests.get(
                f"{base}{path}",
                verify=str(pki / "ca.crt"),
                cert=(str(pki / "admin.crt"), str(pki / "admin.key")) if cert else None,
                timeout=2,
            )
        except requests.RequestException:
            return False
        return response.status_code == 200

    def _wait_until(
        self,
        process: ManagedProcess,
        ready: Any,
        deadline: float,
        *,
        also_watch: Sequence[ManagedProcess] = (),
    ) -> None:
        while True:
            for watched in (process, *also_watch):
                code = watched.exit_code()
                if code is not None:
                    output = watched.output_tail()
                    if "address already in use" in output:
                        raise _PortTaken
                    raise ControlPlaneError(f"{watched.name} exited with {code}:\n{output}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{process.name} not ready within {self.startup_timeout}s:\n"
                    f"{process.output_tail()}"
                )
            time.sleep(0.1)


class ExistingCluster:
    """The `Cluster` surface over a cluster someone else runs (`M2M_E2E_EXISTING_CLUSTER=1`)."""

    def __init__(self, kubeconfig: Path) -> None:
        self._kubeconfig = kubeconfig
        self._dir = Path(tempfile.mkdtemp(prefix="m2m-existing-cluster-"))
        self._serial = 0

    @property
    def kubeconfig(self) -> Path:
        return self._kubeconfig

    def api_client(self) -> k8s.ApiClient:
        return new_api_client(self._kubeconfig)

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> Path:
        self._serial += 1
        with self.api_client() as api:
            token = request_service_account_token(
                api, namespace, name, expiration_seconds=expiration_seconds
            )
            return write_token_kubeconfig(
                api, token, self._dir / f"sa-{namespace}-{name}-{self._serial}.kubeconfig"
            )

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
