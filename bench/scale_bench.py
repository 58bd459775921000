"""The operator at scale, end to end: N TokenRequests on a real control plane.

Why a benchmark of its own: the figures that matter in production (time until
a burst of TokenRequests is Ready, memory per 1,000 of them, idle CPU, what a
restart costs, and whether other people's Secrets end up in the process) are
properties of the whole operator with its Kubernetes watches, not of the cache
alone (that is `cache_bench.py`).

What it runs, all on 127.0.0.1:

- a real kube-apiserver + etcd (`devenv.controlplane.ControlPlane`), with the
  shipped CRD and RBAC (`devenv.install`);
- the operator as a child process, as its own ServiceAccount
  (`devenv.operatorprocess`), like the e2e tests;
- a fake token endpoint that answers in 50 ms with unique JWT-shaped tokens and
  counts its calls per scope.

Phases: start empty (RSS empty) → create N TokenRequests over S scopes in K
namespaces at once, watch for each one's first Ready=True (all-Ready time,
create→Ready p50/p99; latency from the moment the create call returned) →
RSS loaded → every TokenIssued event posted (the operator posts events in the
background, after the statuses: `events_posted_s`) → idle window (CPU from
/proc/<pid>/stat, Secret writes seen by a watch on the managed Secrets, token
calls, RSS idle) → restart (token calls
and Secret writes until the operator has looked at every TokenRequest again,
RSS at start) → M unrelated Secrets of X bytes in another namespace → restart
again (RSS at start with them).

Prints ONE JSON line. Not part of `make test`: `make bench-scale`, or

    .venv/bin/python bench/scale_bench.py --quick
    .venv/bin/python bench/scale_bench.py --n 1000 --scopes 100 --namespaces 10 \
        --unrelated 2000 --unrelated-size 65536 --idle-seconds 60

The machine may be shared: the load average (`/proc/loadavg`) is in the output.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

GROUP, VERSION, PLURAL = "m2m.dev", "v1alpha1", "tokenrequests"
MANAGED_BY = "app.kubernetes.io/managed-by=m2m-token-operator"
# Kopf's line once an object's handlers ran after a start: "looked at it" (resume handlers
# in older versions, the one event handler since Kopf keeps no state on TokenRequests).
LOOKED = re.compile(
    r"\[([^\]/]+/[^\]]+)\] (?:Resuming is processed|Handler 'tokenrequest' succeeded)"
)


# --- the fake token endpoint -------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class TokenEndpoint:
    """An OAuth token endpoint on loopback: fixed latency, unique tokens, calls per scope."""

    def __init__(self, *, latency: float = 0.05, expires_in: int = 3600) -> None:
        self.latency = latency
        self.expires_in = expires_in
        self.calls: list[tuple[float, str]] = []  # (monotonic time, scope)
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                scope = form.get("scope", [""])[0]
                time.sleep(endpoint.latency)
                with endpoint._lock:
                    endpoint.calls.append((time.monotonic(), scope))
                # App roles, as Entra puts them in a token for a caller that was granted
                # some: without them every TokenRequest also gets a NoAppRoles warning.
                claims = {
                    "scp": scope,
                    "roles": ["access_as_application"],
                    "jti": uuid.uuid4().hex,
                    "iat": int(time.time()),
                }
                token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.c2ln"
                body = json.dumps(
                    {
                        "access_token": token,
                        "token_type": "Bearer",
                        "expires_in": endpoint.expires_in,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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

    def calls_since(self, since: float) -> list[str]:
        with self._lock:
            return [scope for at, scope in self.calls if at >= since]


# --- watches of the cluster, recording what happened when --------------------------


@dataclass
class Recorder:
    """First Ready=True per TokenRequest, and every event of a managed Secret."""

    ready_at: dict[tuple[str, str], float] = field(default_factory=dict)
    secret_writes: list[tuple[float, str]] = field(default_factory=list)
    issued_events: set[tuple[str, str]] = field(default_factory=set)  # TokenIssued, per object
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def writes_since(self, since: float) -> int:
        with self.lock:
            return sum(1 for at, kind in self.secret_writes if at >= since and kind != "DELETED")

    def ready_count(self) -> int:
        with self.lock:
            return len(self.ready_at)

    def issued_count(self) -> int:
        with self.lock:
            return len(self.issued_events)


def _is_ready(body: dict[str, Any]) -> bool:
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _version(obj: Any) -> str:
    """The resourceVersion of a list or object, as a dict (custom objects) or a model."""
    if isinstance(obj, dict):
        return str(obj["metadata"]["resourceVersion"])
    return str(obj.metadata.resource_version)


def _watch_forever(
    recorder: Recorder, list_fn: Callable[..., Any], on_event: Callable[[str, Any], None], **kw: Any
) -> None:
    """List once for a resourceVersion, then watch from it, resuming until stopped."""
    version = _version(list_fn(**kw))
    while not recorder.stop.is_set():
        watcher = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in watcher.stream(  # type: ignore[no-untyped-call]
                list_fn, resource_version=version, timeout_seconds=30, **kw
            ):
                version = _version(event["object"])
                on_event(event["type"], event["object"])
                if recorder.stop.is_set():
                    break
        except k8s.ApiException as error:
            if error.status != 410:
                raise
            version = _version(list_fn(**kw))  # too old: go on from now
        except Exception:
            if recorder.stop.is_set():
                return  # the control plane is going away at the end of the run
            raise


def start_recording(kubeconfig: Path, recorder: Recorder) -> list[threading.Thread]:
    tr_api = new_api_client(kubeconfig)
    secret_api = new_api_client(kubeconfig)
    custom = k8s.CustomObjectsApi(tr_api)
    core = k8s.CoreV1Api(secret_api)

    def on_token_request(kind: str, obj: Any) -> None:
        if kind in ("ADDED", "MODIFIED") and _is_ready(obj):
            meta = obj["metadata"]
            ref = (meta["namespace"], meta["name"])
            with recorder.lock:
                recorder.ready_at.setdefault(ref, time.monotonic())

    def on_secret(kind: str, _obj: Any) -> None:
        with recorder.lock:
            recorder.secret_writes.append((time.monotonic(), kind))

    def on_event(kind: str, obj: Any) -> None:
        if kind == "ADDED":
            involved = obj.involved_object
            with recorder.lock:
                recorder.issued_events.add((involved.namespace, involved.name))

    threads = [
        threading.Thread(
            target=_watch_forever,
            args=(recorder, custom.list_cluster_custom_object, on_token_request),
            kwargs={"group": GROUP, "version": VERSION, "plural": PLURAL},
            daemon=True,
        ),
        threading.Thread(
            target=_watch_forever,
            args=(recorder, core.list_secret_for_all_namespaces, on_secret),
            kwargs={"label_selector": MANAGED_BY},
            daemon=True,
        ),
        # The operator posts its events in the background, after the statuses: the idle
        # window starts once every TokenRequest's TokenIssued event is in.
        threading.Thread(
            target=_watch_forever,
            args=(
                recorder,
                k8s.CoreV1Api(new_api_client(kubeconfig)).list_event_for_all_namespaces,
                on_event,
            ),
            kwargs={"field_selector": "reason=TokenIssued"},
            daemon=True,
        ),
    ]
    for thread in threads:
        thread.start()
    return threads


# --- the operator process -----------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def control_plane_cpu_seconds(cluster: ControlPlane) -> float:
    """CPU time of kube-apiserver and etcd: what the operator's requests cost the cluster."""
    return sum(cpu_seconds(pid) for pid in cluster.process_ids())


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        time.sleep(0.05)


def wait_quiet(operator: OperatorProcess, *, quiet: float, timeout: float) -> float:
    """Wait until the operator's log has not grown for `quiet` seconds; how long it took."""
    started = time.monotonic()
    size, since = operator.log_size(), started
    while time.monotonic() - since < quiet:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the operator's log never went quiet within {timeout}s")
        time.sleep(0.2)
        current = operator.log_size()
        if current != size:
            size, since = current, time.monotonic()
    return round(time.monotonic() - started, 2)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


# --- the run ------------------------------------------------------------------------


@dataclass
class Options:
    n: int
    scopes: int
    namespaces: int
    unrelated: int
    unrelated_size: int
    idle_seconds: float
    latency: float
    timeout: float
    log_dir: Path | None
    verbose: bool = False


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="TokenRequests (default 1000)")
    parser.add_argument("--scopes", type=int, default=100, help="distinct scopes (default 100)")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces (default 10)")
    parser.add_argument("--unrelated", type=int, default=2000, help="unrelated Secrets (2000)")
    parser.add_argument(
        "--unrelated-size", type=int, default=65536, help="bytes per unrelated Secret (64 KiB)"
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window (60 s)")
    parser.add_argument("--latency", type=float, default=0.05, help="token endpoint latency (s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase (s)")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the operator's log")
    parser.add_argument(
        "--verbose", action="store_true", help="the operator logs at debug level (costs CPU)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N=100 over 10 scopes, 200 unrelated Secrets, 10 s idle (a cheap check)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.scopes, args.unrelated, args.idle_seconds = 100, 10, 200, 10.0
    return Options(
        n=args.n,
        scopes=args.scopes,
        namespaces=args.namespaces,
        unrelated=args.unrelated,
        unrelated_size=args.unrelated_size,
        idle_seconds=args.idle_seconds,
        latency=args.latency,
        timeout=args.timeout,
        log_dir=args.log_dir,
        verbose=args.verbose,
    )


@contextmanager
def _pool(workers: int) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        yield pool


def create_token_requests(
    kubeconfig: Path, namespaces: list[str], options: Options
) -> dict[tuple[str, str], float]:
    """Create all at once from 8 client threads; returns when each create call returned."""
    local = threading.local()

    def custom() -> k8s.CustomObjectsApi:
        if not hasattr(local, "api"):
            local.api = k8s.CustomObjectsApi(new_api_client(kubeconfig))
        api: k8s.CustomObjectsApi = local.api
        return api

    def create(index: int) -> tuple[tuple[str, str], float]:
        namespace = namespaces[index % len(namespaces)]
        name = f"tr-{index:05d}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TokenRequest",
            "metadata": {"name": name},
            "spec": {"scope": f"api://bench-{index % options.scopes:04d}/.default"},
        }
        custom().create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        return (namespace, name), time.monotonic()

    with _pool(8) as pool:
        return dict(pool.map(create, range(options.n)))


def create_unrelated_secrets(kubeconfig: Path, namespace: str, options: Options) -> None:
    """Helm-release-like Secrets nobody asked the operator about."""
    local = threading.local()
    payload = base64.b64encode(os.urandom(options.unrelated_size)).decode()

    def create(index: int) -> None:
        if not hasattr(local, "api"):
            local.api = k8s.CoreV1Api(new_api_client(kubeconfig))
        body = k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(
                name=f"sh.helm.release.v1.app{index:05d}.v1", labels={"owner": "helm"}
            ),
            type="helm.sh/release.v1",
            data={"release": payload},
        )
        local.api.create_namespaced_secret(namespace, body)

    with _pool(8) as pool:
        list(pool.map(create, range(options.unrelated)))


def restart(operator: OperatorProcess, endpoint: TokenEndpoint, recorder: Recorder, n: int,
            timeout: float) -> dict[str, float]:  # fmt: skip
    """Stop, start, and wait until it has looked at all N again; what that cost."""
    operator.stop()
    since = time.monotonic()
    log_from = operator.log_size()
    operator.start(timeout=timeout)
    assert operator.pid is not None
    wait_until(
        lambda: len(set(LOOKED.findall(operator.log_text()[log_from:]))) >= n,
        timeout=timeout,
        what=f"resume of all {n} TokenRequests",
    )
    looked = time.monotonic() - since
    return {
        "seconds_to_look_at_all": round(looked, 2),
        "token_calls": len(endpoint.calls_since(since)),
        "secret_writes": recorder.writes_since(since),
        "rss_mib": round(rss_mib(operator.pid), 1),
    }


def run(options: Options) -> dict[str, Any]:
    result: dict[str, Any] = {
        "n": options.n,
        "scopes": options.scopes,
        "namespaces": options.namespaces,
        "unrelated_secrets": options.unrelated,
        "unrelated_secret_bytes": options.unrelated_size,
        "idle_window_s": options.idle_seconds,
        "endpoint_latency_s": options.latency,
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
    }
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="m2m-scale-bench-"))
    with (
        ControlPlane() as cluster,
        TokenEndpoint(latency=options.latency) as endpoint,
        cluster.api_client() as admin,
    ):
        install_operator(admin)
        operator_kubeconfig = cluster.service_account_kubeconfig(
            OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, expiration_seconds=4 * 3600
        )
        core = k8s.CoreV1Api(admin)
        namespaces = [f"bench-{i:02d}" for i in range(options.namespaces)]
        for name in [*namespaces, "bench-unrelated"]:
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        recorder = Recorder()
        start_recording(cluster.kubeconfig, recorder)
        operator = OperatorProcess(
            kubeconfig=operator_kubeconfig,
            log_file=log_dir / "operator.log",
            identity=Identity(
                client_id="bench-operator",
                client_secret="bench-secret",
                token_endpoint=endpoint.url,
            ),
            cluster_name="bench",
            args=["--standalone", "--all-namespaces", *(["--verbose"] if options.verbose else [])],
            settings={
                "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
                "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": f"127.0.0.1:{endpoint.port}",
                "M2M_LOG_FORMAT": "text",
                # The operator's identity serves only selected namespaces: here, every one
                # (a selector every namespace matches; ignored by versions without it).
                "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": "kubernetes.io/metadata.name",
            },
            name="operator",
        )
        operator.start(timeout=options.timeout)
        try:
            assert operator.pid is not None
            result["rss_empty_mib"] = round(rss_mib(operator.pid), 1)

            # The burst.
            operator_cpu_from = cpu_seconds(operator.pid)
            cluster_cpu_from = control_plane_cpu_seconds(cluster)
            started = time.monotonic()
            created = create_token_requests(cluster.kubeconfig, namespaces, options)
            result["create_seconds"] = round(time.monotonic() - started, 2)
            wait_until(
                lambda: recorder.ready_count() >= options.n,
                timeout=options.timeout,
                what=f"{options.n} Ready TokenRequests",
            )
            with recorder.lock:
                ready = dict(recorder.ready_at)
            result["all_ready_s"] = round(max(ready.values()) - started, 2)
            # CPU seconds spent until all were Ready (including the burst's own creates in
            # the control plane): on a shared machine a steadier figure than the seconds.
            result["burst_cpu_s"] = {
                "operator": round(cpu_seconds(operator.pid) - operator_cpu_from, 2),
                "control_plane": round(control_plane_cpu_seconds(cluster) - cluster_cpu_from, 2),
            }
            latencies = [ready[ref] - at for ref, at in created.items()]
            result["latency_p50_s"] = round(statistics.median(latencies), 3)
            result["latency_p99_s"] = round(percentile(latencies, 0.99), 3)
            calls = Counter(endpoint.calls_since(started))
            result["token_calls"] = sum(calls.values())
            result["token_calls_per_scope"] = round(sum(calls.values()) / options.scopes, 3)
            result["rss_loaded_mib"] = round(rss_mib(operator.pid), 1)
            result["loadavg_burst"] = loadavg()

            # Idle: nothing is due for the next 40 minutes (1 h tokens). The window starts
            # once the burst's tail is done: every TokenIssued event posted (they follow the
            # statuses, in the background), then the operator's log quiet for 3 s (Kopf
            # logs a line for every TokenRequest event it handles).
            settle_from = time.monotonic()
            wait_until(
                lambda: recorder.issued_count() >= options.n,
                timeout=options.timeout,
                what=f"{options.n} TokenIssued events",
            )
            result["events_posted_s"] = round(time.monotonic() - started, 2)
            wait_quiet(operator, quiet=3.0, timeout=options.timeout)
            result["settle_s"] = round(time.monotonic() - settle_from, 2)
            idle_from = time.monotonic()
            cpu_from = cpu_seconds(operator.pid)
            time.sleep(options.idle_seconds)  # measuring a window, not waiting for an outcome
            window = time.monotonic() - idle_from
            cpu = cpu_seconds(operator.pid) - cpu_from
            result["idle_cpu_percent"] = round(100 * cpu / window, 2)
            result["idle_secret_writes"] = recorder.writes_since(idle_from)
            result["idle_token_calls"] = len(endpoint.calls_since(idle_from))
            result["rss_idle_mib"] = round(rss_mib(operator.pid), 1)
            result["loadavg_idle"] = loadavg()

            # Restart without, then with, unrelated Secrets in the cluster.
            result["restart"] = restart(operator, endpoint, recorder, options.n, options.timeout)
            if options.unrelated:
                made = time.monotonic()
                create_unrelated_secrets(cluster.kubeconfig, "bench-unrelated", options)
                result["unrelated_create_s"] = round(time.monotonic() - made, 1)
                result["restart_with_unrelated"] = restart(
                    operator, endpoint, recorder, options.n, options.timeout
                )
                without = result["restart"]["rss_mib"]
                with_them = result["restart_with_unrelated"]["rss_mib"]
                result["rss_unrelated_ratio"] = round(with_them / without, 3)
            result["loadavg_end"] = loadavg()
        finally:
            recorder.stop.set()
            operator.stop()
            result["operator_log"] = str(operator.log_file)
    return result


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    result = run(options)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
