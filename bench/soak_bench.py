"""Soak: short tokens through endpoint outages, API-server freezes and operator kills.

The question (issue 17, item 9): does any Secret ever hold an expired token
although every fault ended before the tokens could expire? The figure is
**expired Secret-seconds**: summed over the managed Secrets, how long each held
a token past its expiry. It must be 0.

What it runs, all on 127.0.0.1:

- a real kube-apiserver + etcd (`devenv.controlplane.ControlPlane`) with the
  shipped CRD and RBAC, and the operator as a child process with its own
  ServiceAccount (`devenv.operatorprocess`), as `scale_bench.py` does;
- a token endpoint issuing `--lifetime`-second JWT-shaped tokens (30 s: the
  default rule refreshes them about 10 s before expiry), which answers HTTP 500
  while an outage is on.

Phases: N TokenRequests over S scopes in K namespaces, all written → a calm
window of one token lifetime (the baseline, measured in the same run: no fault,
so 0 expected) → the fault phase: one fault per `--period` seconds, at a random
moment of its period (seeded), in turn an endpoint outage (`--outage`
seconds, HTTP 500), an API-server freeze (SIGSTOP of kube-apiserver for
`--freeze` seconds, then SIGCONT) and an operator SIGKILL followed by a
restart → a tail of one lifetime without faults.

Outages and freezes are shorter than a third of the token lifetime, so a token
refreshed on time never needs to expire. Every Secret version is seen by a
watch (list first, and again after a 410): a Secret holds, from the moment its
version is seen until the next one, the token whose `expires-at` it carries.
Expired time is counted per fault kind (the last fault that started before
it) and for the calm window.

Prints ONE JSON line. Not part of `make test`: `make bench-soak`, or

    .venv/bin/python bench/soak_bench.py --quick      # about a minute
    .venv/bin/python bench/soak_bench.py              # about four minutes
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from devenv.controlplane import ControlPlane, new_api_client
from devenv.install import OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, install_operator
from devenv.operatorprocess import Identity, OperatorProcess
from m2m_token_operator.api.secret_layout import EXPIRES_AT_KEY
from m2m_token_operator.api.timefmt import parse_time

GROUP, VERSION, PLURAL = "m2m.dev", "v1alpha1", "tokenrequests"
MANAGED_BY = "app.kubernetes.io/managed-by=m2m-token-operator"

# --- the token endpoint -------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class TokenEndpoint:
    """Short-lived unique tokens; HTTP 500 while `down` is set. Records every call."""

    def __init__(self, *, expires_in: int) -> None:
        self.expires_in = expires_in
        self.down = threading.Event()
        self.calls: list[tuple[float, str, int]] = []  # (wall time, scope, HTTP status)
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                scope = parse_qs(self.rfile.read(length).decode()).get("scope", [""])[0]
                status = 500 if endpoint.down.is_set() else 200
                body: dict[str, Any]
                with endpoint._lock:
                    endpoint.calls.append((time.time(), scope, status))
                if status == 500:
                    body = {"error": "server_error", "error_description": "soak outage"}
                else:
                    claims = {
                        "scp": scope,
                        "roles": ["access_as_application"],
                        "jti": uuid.uuid4().hex,
                        "iat": int(time.time()),
                    }
                    body = {
                        "access_token": f"{_b64({'alg': 'none'})}.{_b64(claims)}.c2ln",
                        "token_type": "Bearer",
                        "expires_in": endpoint.expires_in,
                    }
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth2/v2.0/token"

    def __enter__(self) -> TokenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def between(self, start: float, end: float) -> list[tuple[float, str, int]]:
        with self._lock:
            return [call for call in self.calls if start <= call[0] < end]


# --- what every managed Secret held, and when ---------------------------------------


@dataclass
class SecretHistory:
    """Per Secret: (wall time seen, expiry of the token it holds) for every version."""

    versions: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def record(self, secret: Any) -> None:
        meta = secret.metadata
        encoded = (secret.data or {}).get(EXPIRES_AT_KEY)
        if not encoded:
            return
        expires = parse_time(base64.b64decode(encoded).decode()).timestamp()
        ref = f"{meta.namespace}/{meta.name}"
        with self.lock:
            history = self.versions.setdefault(ref, [])
            if not history or history[-1][1] != expires:
                history.append((time.time(), expires))

    def count(self) -> int:
        with self.lock:
            return len(self.versions)

    def expired_intervals(self, end: float) -> list[tuple[str, float, float]]:
        """(Secret, from, to) for every stretch in which a Secret held an expired token."""
        intervals: list[tuple[str, float, float]] = []
        with self.lock:
            for ref, history in self.versions.items():
                for index, (seen, expires) in enumerate(history):
                    until = history[index + 1][0] if index + 1 < len(history) else end
                    start = max(seen, expires)
                    if until > start:
                        intervals.append((ref, start, until))
        return intervals


def watch_secrets(kubeconfig: Path, history: SecretHistory) -> threading.Thread:
    core = k8s.CoreV1Api(new_api_client(kubeconfig))

    def relist() -> str:
        listed = core.list_secret_for_all_namespaces(label_selector=MANAGED_BY)
        for secret in listed.items:
            history.record(secret)
        return str(listed.metadata.resource_version if listed.metadata else "")

    def run() -> None:
        version = relist()
        while not history.stop.is_set():
            watcher = k8s_watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in watcher.stream(  # type: ignore[no-untyped-call]
                    core.list_secret_for_all_namespaces,
                    label_selector=MANAGED_BY,
                    resource_version=version,
                    timeout_seconds=30,
                ):
                    version = str(event["object"].metadata.resource_version)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        history.record(event["object"])
                    if history.stop.is_set():
                        return
            except k8s.ApiException as error:
                if error.status != 410:
                    raise
                version = relist()  # too old: what every Secret holds now, then on
            except Exception:
                if history.stop.is_set():
                    return  # the control plane is going away at the end of the run
                time.sleep(0.2)  # a connection cut by a freeze: resume from `version`

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- the run ------------------------------------------------------------------------


@dataclass
class Options:
    n: int
    scopes: int
    namespaces: int
    lifetime: int
    period: float
    faults: int
    outage: float
    freeze: float
    seed: int
    calm: float
    timeout: float
    log_dir: Path | None


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="TokenRequests (200)")
    parser.add_argument("--scopes", type=int, default=40, help="distinct scopes (40)")
    parser.add_argument("--namespaces", type=int, default=4, help="namespaces (4)")
    parser.add_argument("--lifetime", type=int, default=30, help="token lifetime, s (30)")
    parser.add_argument("--period", type=float, default=20.0, help="one fault per period (20 s)")
    parser.add_argument("--faults", type=int, default=9, help="faults in all (9: 3 of each)")
    parser.add_argument("--outage", type=float, default=8.0, help="endpoint outage, s (8)")
    parser.add_argument("--freeze", type=float, default=8.0, help="API-server freeze, s (8)")
    parser.add_argument("--seed", type=int, default=17, help="random seed of the fault times")
    parser.add_argument("--timeout", type=float, default=300.0, help="per wait (s)")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the operator's log")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="60 TokenRequests, 12 scopes, 3 faults 12 s apart, a 10 s calm window",
    )
    args = parser.parse_args(argv)
    args.calm = args.lifetime
    if args.quick:
        args.n, args.scopes, args.faults, args.period, args.calm = 60, 12, 3, 12.0, 10.0
    if max(args.outage, args.freeze) >= args.lifetime / 3:
        parser.error("outages and freezes must be shorter than a third of the lifetime")
    if args.period < max(args.outage, args.freeze) + 4:
        parser.error("the period must leave room for its fault")
    return Options(
        n=args.n,
        scopes=args.scopes,
        namespaces=args.namespaces,
        lifetime=args.lifetime,
        period=args.period,
        faults=args.faults,
        outage=args.outage,
        freeze=args.freeze,
        seed=args.seed,
        calm=args.calm,
        timeout=args.timeout,
        log_dir=args.log_dir,
    )


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        time.sleep(0.1)


def sleep_until(moment: float) -> None:
    """Wait for a wall-clock moment of the fault schedule (a schedule, not an assertion)."""
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def apiserver_pid(cluster: ControlPlane) -> int:
    for pid in cluster.process_ids():
        if b"kube-apiserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise RuntimeError("no kube-apiserver process")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def create_token_requests(kubeconfig: Path, namespaces: list[str], options: Options) -> None:
    custom = k8s.CustomObjectsApi(new_api_client(kubeconfig))
    for index in range(options.n):
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TokenRequest",
            "metadata": {"name": f"tr-{index:04d}"},
            "spec": {"scope": f"api://soak-{index % options.scopes:03d}/.default"},
        }
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespaces[index % len(namespaces)], PLURAL, body
        )


def inject(
    kind: str, options: Options, endpoint: TokenEndpoint, cluster: ControlPlane, op: OperatorProcess
) -> float:
    """One fault, from now until it is over; how long the operator was away (kills)."""
    if kind == "outage":
        endpoint.down.set()
        time.sleep(options.outage)  # the fault's duration
        endpoint.down.clear()
        return 0.0
    if kind == "freeze":
        pid = apiserver_pid(cluster)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(options.freeze)  # the fault's duration
        finally:
            os.kill(pid, signal.SIGCONT)
        return 0.0
    killed = time.monotonic()
    op.kill()
    op.start(timeout=options.timeout)
    return time.monotonic() - killed


def run(options: Options) -> dict[str, Any]:
    result: dict[str, Any] = {
        "n": options.n,
        "scopes": options.scopes,
        "namespaces": options.namespaces,
        "token_lifetime_s": options.lifetime,
        "outage_s": options.outage,
        "freeze_s": options.freeze,
        "fault_period_s": options.period,
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
    }
    rng = random.Random(options.seed)
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="m2m-soak-bench-"))
    history = SecretHistory()
    with (
        ControlPlane() as cluster,
        TokenEndpoint(expires_in=options.lifetime) as endpoint,
        cluster.api_client() as admin,
    ):
        install_operator(admin)
        operator_kubeconfig = cluster.service_account_kubeconfig(
            OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, expiration_seconds=4 * 3600
        )
        core = k8s.CoreV1Api(admin)
        namespaces = [f"soak-{i:02d}" for i in range(options.namespaces)]
        for name in namespaces:
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        watch_secrets(cluster.kubeconfig, history)
        operator = OperatorProcess(
            kubeconfig=operator_kubeconfig,
            log_file=log_dir / "operator.log",
            identity=Identity(
                client_id="soak-operator", client_secret="soak-secret", token_endpoint=endpoint.url
            ),
            cluster_name="soak",
            args=["--standalone", "--all-namespaces"],
            settings={
                "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
                "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": f"127.0.0.1:{endpoint.port}",
                "M2M_LOG_FORMAT": "text",
                "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": "kubernetes.io/metadata.name",
            },
            name="operator",
        )
        operator.start(timeout=options.timeout)
        faults: list[tuple[float, str]] = []  # (wall time started, kind)
        restarts: list[float] = []
        try:
            started = time.time()
            create_token_requests(cluster.kubeconfig, namespaces, options)
            wait_until(
                lambda: history.count() >= options.n,
                timeout=options.timeout,
                what=f"{options.n} Secrets",
            )
            result["all_written_s"] = round(time.time() - started, 2)

            calm_from = time.time()
            sleep_until(calm_from + options.calm)  # the baseline window
            faults_from = time.time()
            kinds = ["outage", "freeze", "kill"]
            for index in range(options.faults):
                kind = kinds[index % len(kinds)]
                length = {"outage": options.outage, "freeze": options.freeze}.get(kind, 5.0)
                period_start = faults_from + index * options.period
                sleep_until(period_start + rng.uniform(0, options.period - length - 2))
                faults.append((time.time(), kind))
                away = inject(kind, options, endpoint, cluster, operator)
                if kind == "kill":
                    restarts.append(round(away, 2))
            sleep_until(faults_from + options.faults * options.period)
            tail_from = time.time()
            sleep_until(tail_from + options.lifetime)  # any token left expired shows here
            end = time.time()
        finally:
            history.stop.set()
            endpoint.down.clear()
            operator.stop()
        result["loadavg_end"] = loadavg()
        result["operator_log"] = str(operator.log_file)

    intervals = history.expired_intervals(end)
    by_phase: dict[str, float] = {}
    worst: dict[str, float] = {}
    for ref, start, until in intervals:
        phase = "calm"
        for at, kind in faults:
            if at <= start:
                phase = kind
        by_phase[phase] = by_phase.get(phase, 0.0) + (until - start)
        worst[ref] = worst.get(ref, 0.0) + (until - start)
    calls = endpoint.between(calm_from, end)
    fault_calls = endpoint.between(faults_from, end)
    lifetimes = (end - faults_from) / options.lifetime
    result.update(
        {
            "secrets": history.count(),
            "faults": Counter(kind for _, kind in faults),
            "operator_restart_s": restarts,
            "soak_s": round(end - calm_from, 1),
            "expired_secret_seconds": round(sum(until - start for _, start, until in intervals), 2),
            "expired_secret_seconds_by_phase": {k: round(v, 2) for k, v in by_phase.items()},
            "expired_secrets": len(worst),
            "worst_secret_expired_s": round(max(worst.values(), default=0.0), 2),
            "baseline_calm_expired_secret_seconds": round(by_phase.get("calm", 0.0), 2),
            "token_calls": len(calls),
            "token_calls_failed": sum(1 for _, _, status in calls if status != 200),
            # The per-key bound: successful calls per scope per token lifetime (about 1.5
            # for the default refresh at two thirds; restarts cost none).
            "token_calls_ok_per_scope_per_lifetime": round(
                sum(1 for _, _, status in fault_calls if status == 200)
                / options.scopes
                / lifetimes,
                2,
            ),
            "token_calls_per_scope_per_outage": round(
                sum(1 for _, _, status in fault_calls if status != 200)
                / options.scopes
                / max(1, sum(1 for _, kind in faults if kind == "outage")),
                2,
            ),
        }
    )
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
