"""The operator at scale, end to end, against the floor: N TokenRequests on a real control plane.

Why a benchmark of its own: the figures that matter in production (time until
a burst of TokenRequests is Ready, CPU and memory per TokenRequest, idle CPU,
what a restart costs, and whether other people's Secrets end up in the
process) are properties of the whole operator with its Kubernetes watches, not
of the cache alone (that is `cache_bench.py`).

Why a floor: on a shared 2-core machine absolute seconds say more about the
load than about the operator, and the control plane alone costs about 10 ms of
CPU per TokenRequest. The yardstick is `floor_operator.py`, the least work any
operator must do (one watch; per TokenRequest one Secret create, one status
patch, one Event; one token call per scope), run on the same control plane in
the same run, alternating with ours: floor, ours, floor, ours (`--pairs`). Our
figures are printed next to the floor's, with ours/floor per pair.

What it runs, all on 127.0.0.1:

- a real kube-apiserver + etcd (`devenv.controlplane.ControlPlane`), with the
  shipped CRD, RBAC and admission policy (`devenv.install`);
- the operator, or the floor, as a child process, as the operator's own
  ServiceAccount (`devenv.operatorprocess`), like the e2e tests;
- a fake token endpoint that answers in 50 ms with unique JWT-shaped tokens and
  counts its calls per scope.

Each run gets its own K namespaces. Phases: start empty (RSS empty) → scrape
the API server's `apiserver_request_total` → create N TokenRequests over S
scopes at once, watch for each one's first Ready=True (all-Ready time,
create→Ready p50/p99 from the moment its create call returned; CPU of the
operator and of the control plane until then) → RSS loaded → every TokenIssued
event posted, the operator's log quiet for 3 s (CPU until then: "settled") →
scrape again: the requests per TokenRequest by verb and resource → idle window
(CPU from /proc/<pid>/stat, Secret writes seen by a watch on the managed
Secrets, token calls, RSS idle) → the operator stopped, the namespaces deleted
and waited for until they are gone. After the last run of ours, before its
namespaces go: restart (token calls and Secret writes until the operator has
looked at every TokenRequest again, RSS at start) → M unrelated Secrets of X
bytes in another namespace → restart again (RSS at start with them).

Prints a table (floor, ours, ratio per pair) and then ONE JSON line with every
figure. Not part of `make test`: `make bench-scale`, or

    .venv/bin/python bench/scale_bench.py --quick
    .venv/bin/python bench/scale_bench.py --count 1000 --scopes 100 --namespaces 10 \
        --pairs 2 --unrelated 2000 --unrelated-size 65536 --idle-seconds 60
    .venv/bin/python bench/scale_bench.py --pairs 1 --profile-dir /tmp/prof  # py-spy

The machine may be shared: the load average (`/proc/loadavg`) is in the output.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import re
import signal
import statistics
import subprocess
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
from typing import IO, Any, Protocol
from urllib.parse import parse_qs

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from devenv.benchfigures import (
    RequestKey,
    parse_metric,
    parse_tcp_counters,
    percentile,
    ratio,
    request_delta,
    slowest,
    spread,
    work_requests,
)
from devenv.controlplane import ControlPlane, new_api_client
from devenv.install import OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, install_operator
from devenv.operatorprocess import Identity, OperatorProcess
from devenv.process import _die_with_parent

GROUP, VERSION, PLURAL = "m2m.dev", "v1alpha1", "tokenrequests"
MANAGED_BY = "app.kubernetes.io/managed-by=m2m-token-operator"
FLOOR_SCRIPT = Path(__file__).resolve().parent / "floor_operator.py"
# The operator's line once it has looked at an object after a start; Kopf's, from older
# versions (whose Kopf handlers looked), so that an old commit can be measured the same way.
LOOKED = re.compile(
    r"tokenrequest=([^\s/]+/\S+) \S+ looked at:"
    r"|\[([^\]/]+/[^\]]+)\] (?:Resuming is processed|Handler 'tokenrequest' succeeded)"
)


def say(text: str) -> None:
    """Progress, on stderr: stdout holds the table and the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the fake token endpoint -------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class _EndpointServer(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: with dozens of token requests opening
    # connections at once, the kernel dropped SYNs and the client resent them after
    # 1 s (and 3 s), a latency of this stand-in's, not of the endpoint it stands for.
    request_queue_size = 1024
    daemon_threads = True


class TokenEndpoint:
    """An OAuth token endpoint on loopback: fixed latency, unique tokens, calls per scope."""

    def __init__(self, *, latency: float = 0.05, expires_in: int = 3600) -> None:
        self.latency = latency
        self.expires_in = expires_in
        self.calls: list[tuple[float, str]] = []  # (monotonic time, scope)
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as Entra ID's endpoint: HTTP/1.0 cost a connection per call.
            protocol_version = "HTTP/1.1"

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

        self._server = _EndpointServer(("127.0.0.1", 0), Handler)
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
    """First Ready=True per TokenRequest uid, TokenIssued events, every managed Secret event."""

    ready_at: dict[str, float] = field(default_factory=dict)  # uid -> monotonic time
    secret_writes: list[tuple[float, str]] = field(default_factory=list)
    issued_events: set[str] = field(default_factory=set)  # uids with a TokenIssued event
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def writes_since(self, since: float) -> int:
        with self.lock:
            return sum(1 for at, kind in self.secret_writes if at >= since and kind != "DELETED")

    def count_ready(self, uids: set[str]) -> int:
        with self.lock:
            return len(uids & self.ready_at.keys())

    def count_issued(self, uids: set[str]) -> int:
        with self.lock:
            return len(uids & self.issued_events)


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
    """List once for a resourceVersion, then watch from it, resuming until stopped.

    The watch asks for an hour (the API server ends it earlier, at a random point of
    its --min-request-timeout): a watch request is counted in `apiserver_request_total`,
    with its bytes, when it ends, and each run's request mix should show the operator's.
    """
    version = _version(list_fn(**kw))
    while not recorder.stop.is_set():
        watcher = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in watcher.stream(  # type: ignore[no-untyped-call]
                list_fn, resource_version=version, timeout_seconds=3600, **kw
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
            with recorder.lock:
                recorder.ready_at.setdefault(obj["metadata"]["uid"], time.monotonic())

    def on_secret(kind: str, _obj: Any) -> None:
        with recorder.lock:
            recorder.secret_writes.append((time.monotonic(), kind))

    def on_event(kind: str, obj: Any) -> None:
        if kind == "ADDED" and obj.involved_object.uid:
            with recorder.lock:
                recorder.issued_events.add(obj.involved_object.uid)

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


class CpuSampler:
    """Every `interval` s: the operator's, the control plane's and this process's CPU seconds.

    Whether the operator was busy all the time (CPU-bound: a single Python thread near
    100 % of a core) or waiting (for the API server, for a slot) during a part of the
    burst is what tells a backlog's cause.
    """

    def __init__(self, pid: int, cluster: ControlPlane, interval: float = 0.5) -> None:
        self._pid, self._cluster, self._interval = pid, cluster, interval
        self.samples: list[tuple[float, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        own = os.times()
        # The operator's event-loop thread: seconds on a CPU, and waiting for one (runnable
        # but not running: the machine's other processes had the cores).
        on_cpu, waiting = (
            int(field) / 1e9
            for field in Path(f"/proc/{self._pid}/task/{self._pid}/schedstat")
            .read_text()
            .split()[:2]
        )
        self.samples.append(
            (
                time.monotonic(),
                cpu_seconds(self._pid),
                control_plane_cpu_seconds(self._cluster),
                own.user + own.system,
                on_cpu,
                waiting,
            )
        )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_tenth(self) -> list[list[int]]:
        """% of one core per tenth of the sampled time: operator, control plane, bench; then
        the operator's event-loop thread: running, and runnable but waiting for a core."""
        if len(self.samples) < 2:
            return []
        start, end = self.samples[0][0], self.samples[-1][0]
        figures = []
        for tenth in range(10):
            low = start + (end - start) * tenth / 10
            high = start + (end - start) * (tenth + 1) / 10
            inside = [s for s in self.samples if low <= s[0] <= high]
            if len(inside) < 2:
                continue
            first, last = inside[0], inside[-1]
            wall = last[0] - first[0]
            figures.append([round(100 * (last[i] - first[i]) / wall) for i in (1, 2, 3, 4, 5)])
        return figures


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tcp_counters() -> dict[str, int]:
    """The machine's TcpExt counters of refused or delayed connections ({} if unreadable)."""
    try:
        return parse_tcp_counters(Path("/proc/net/netstat").read_text())
    except OSError:
        return {}


def counters_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if name in before}


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        time.sleep(0.05)


def wait_quiet(operator: Operator, *, quiet: float, timeout: float) -> float:
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


# What the API server did, per TokenRequest, read from its own metrics: the requests by
# verb and resource, their body and response bytes, and the watch events it sent (every
# watcher of a resource gets each change: an operator's extra watches cost here).
API_SERVER_METRICS = {
    "requests_per_tr": "apiserver_request_total",
    "request_bytes_per_tr": "apiserver_request_body_size_bytes_sum",
    "response_bytes_per_tr": "apiserver_response_sizes_sum",
    "watch_events_per_tr": "apiserver_watch_events_total",
    "watch_event_bytes_per_tr": "apiserver_watch_events_sizes_sum",
}


def scrape_api_server(admin: k8s.ApiClient) -> dict[str, dict[RequestKey, float]]:
    """The kube-apiserver's API_SERVER_METRICS by (verb, resource), read as admin."""
    text = metrics_text(admin)
    return {key: parse_metric(text, metric) for key, metric in API_SERVER_METRICS.items()}


def metrics_text(admin: k8s.ApiClient) -> str:
    """The kube-apiserver's /metrics (Prometheus text), read as admin."""
    method, url, headers, body, post_params = admin.param_serialize(
        "GET", "/metrics", header_params={"Accept": "text/plain"}, auth_settings=["BearerToken"]
    )
    response = admin.call_api(method, url, headers, body, post_params, _request_timeout=30)
    text: str = response.read().decode()  # type: ignore[no-untyped-call]
    return text


# --- the operators under test ---------------------------------------------------------


class Operator(Protocol):
    """What a run needs of either operator: ours (`OperatorProcess`) or the floor."""

    log_file: Path

    @property
    def pid(self) -> int | None: ...

    def start(self, *, timeout: float = ...) -> None: ...

    def stop(self, timeout: float = ...) -> int | None: ...

    def log_text(self) -> str: ...

    def log_size(self) -> int: ...


class FloorProcess:
    """`python bench/floor_operator.py` with the operator's kubeconfig and identity."""

    def __init__(self, *, kubeconfig: Path, log_file: Path, identity: Identity) -> None:
        self.kubeconfig = kubeconfig
        self.log_file = log_file
        self.identity = identity
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout: float = 60.0) -> None:
        env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
        env.update(self.identity.as_env(), KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_file.open("wb")
        self._process = subprocess.Popen(
            [sys.executable, str(FLOOR_SCRIPT)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            process_group=0,
        )
        deadline = time.monotonic() + timeout
        while "floor: watching" not in self.log_text():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the floor did not start:\n{self.log_text()[-4000:]}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int | None:
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def log_text(self) -> str:
        if not self.log_file.exists():
            return ""
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def log_size(self) -> int:
        return len(self.log_text())


class Profiler:
    """py-spy recording one process into a raw (collapsed stacks) file, until stopped."""

    def __init__(
        self, pid: int, output: Path, *, rate: int = 200, seconds: float | None = None
    ) -> None:
        self.output = output
        py_spy = Path(sys.executable).parent / "py-spy"  # `pip install py-spy` in the venv
        command = [
            str(py_spy) if py_spy.exists() else "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            *([] if seconds is None else ["--duration", str(max(1, round(seconds)))]),
            "--format",
            "raw",
            "--threads",
            # Only the thread holding the GIL: the Python work, not threads that wait for
            # a socket or a queue (on a loaded machine py-spy takes many of those for active).
            "--gil",
        ]
        log = output.parent / f"{output.name}.log"
        with log.open("wb") as stream:
            self._process = subprocess.Popen(
                [*command, "--output", str(output), "--nonblocking"],
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        # The burst must not start before py-spy samples ("Sampling process ...").
        wait_until(lambda: "Sampling" in log.read_text(), timeout=30, what="py-spy sampling")

    def stop(self) -> None:
        self._process.send_signal(signal.SIGINT)
        self._process.wait(timeout=120)


# --- the run ------------------------------------------------------------------------


@dataclass
class Options:
    n: int
    scopes: int
    namespaces: int
    pairs: int
    unrelated: int
    unrelated_size: int
    idle_seconds: float
    latency: float
    timeout: float
    log_dir: Path | None
    profile_dir: Path | None = None
    profile_seconds: float | None = None  # only the burst's first seconds (at 500 Hz)
    verbose: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    # With settings here, each round also runs ours with them ("variant"), right after ours.
    variant: dict[str, str] = field(default_factory=dict)
    # The variant's operator from this source tree (another commit's checkout) instead.
    variant_tree: Path | None = None
    # The variant is the floor once more: an A/A round, the yardstick's own noise.
    variant_floor: bool = False

    @property
    def with_variant(self) -> bool:
        return bool(self.variant) or self.variant_tree is not None or self.variant_floor


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--count", "--n", dest="n", type=int, default=1000, help="TokenRequests per run (1000)"
    )
    parser.add_argument("--scopes", type=int, default=100, help="distinct scopes (default 100)")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces (default 10)")
    parser.add_argument(
        "--pairs", type=int, default=None, help="floor/ours pairs (default 2; 1 with --quick)"
    )
    parser.add_argument("--unrelated", type=int, default=2000, help="unrelated Secrets (2000)")
    parser.add_argument(
        "--unrelated-size", type=int, default=65536, help="bytes per unrelated Secret (64 KiB)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=60.0, help="idle window per run (60 s)"
    )
    parser.add_argument("--latency", type=float, default=0.05, help="token endpoint latency (s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase (s)")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the operators' logs")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="record the first burst of each with py-spy (raw stacks) here; costs CPU",
    )
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=None,
        help="profile only the burst's first seconds, at 500 samples/s (where the tail is)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="the operator logs at debug level (costs CPU)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an M2M_ setting for our operator (repeatable), e.g. to compare a tuning",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also run ours with this M2M_ setting in every round (repeatable): a tuning "
        "compared with the default in one session, not across sessions of a noisy machine",
    )
    parser.add_argument(
        "--variant-tree",
        type=Path,
        default=None,
        metavar="DIR",
        help="the variant runs the operator from this checkout (e.g. `git worktree add DIR "
        "HEAD~1`): the old commit against the new in the same rounds",
    )
    parser.add_argument(
        "--variant-floor",
        action="store_true",
        help="the variant is the floor again (an A/A round): how far the floor's own figures "
        "stray from run to run, and so how large a ratio the noise alone makes",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N=100 over 10 scopes, 200 unrelated Secrets, 10 s idle, one pair (a cheap check)",
    )
    args = parser.parse_args(argv)
    pairs = args.pairs
    if args.quick:
        args.n, args.scopes, args.unrelated, args.idle_seconds = 100, 10, 200, 10.0
        pairs = 1 if pairs is None else pairs
    pairs = 2 if pairs is None else pairs
    if args.variant_tree is not None and not (args.variant_tree / "operator").is_dir():
        parser.error(f"--variant-tree {args.variant_tree}: no operator/ in it")
    if pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.variant_floor and (args.variant or args.variant_tree is not None):
        parser.error("--variant-floor runs the floor as the variant: no --variant(-tree) with it")
    settings = _settings(parser, "--setting", args.setting)
    variant = _settings(parser, "--variant", args.variant)
    return Options(
        n=args.n,
        scopes=args.scopes,
        namespaces=args.namespaces,
        pairs=pairs,
        unrelated=args.unrelated,
        unrelated_size=args.unrelated_size,
        idle_seconds=args.idle_seconds,
        latency=args.latency,
        timeout=args.timeout,
        log_dir=args.log_dir,
        profile_dir=args.profile_dir,
        profile_seconds=args.profile_seconds,
        verbose=args.verbose,
        settings=settings,
        variant=variant,
        variant_tree=args.variant_tree,
        variant_floor=args.variant_floor,
    )


def _settings(parser: argparse.ArgumentParser, option: str, given: list[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for setting in given:
        name, equals, value = setting.partition("=")
        if not equals or not name.startswith("M2M_"):
            parser.error(f"{option} {setting!r}: expected M2M_NAME=VALUE")
        settings[name] = value
    return settings


@contextmanager
def _pool(workers: int) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        yield pool


def create_token_requests(
    kubeconfig: Path, namespaces: list[str], options: Options, count: int
) -> dict[str, float]:
    """Create all at once from 8 client threads; when each create call returned, by uid."""
    local = threading.local()

    def custom() -> k8s.CustomObjectsApi:
        if not hasattr(local, "api"):
            local.api = k8s.CustomObjectsApi(new_api_client(kubeconfig))
        api: k8s.CustomObjectsApi = local.api
        return api

    def create(index: int) -> tuple[str, float]:
        namespace = namespaces[index % len(namespaces)]
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TokenRequest",
            "metadata": {"name": f"tr-{index:05d}"},
            "spec": {"scope": f"api://bench-{index % options.scopes:04d}/.default"},
        }
        made: Any = custom().create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body
        )
        return str(made["metadata"]["uid"]), time.monotonic()

    with _pool(8) as pool:
        return dict(pool.map(create, range(count)))


def latency_by_tenth(created: dict[str, float], ready: dict[str, float]) -> list[list[float]]:
    """create -> Ready p50 and p99 of each tenth of the burst, in the order of the creates.

    Where the slow ones are tells why: a tail at the start is a warm-up, one growing
    over the burst a backlog, one spread evenly a per-object cost.
    """
    order = sorted(created, key=created.__getitem__)
    tenth = max(1, len(order) // 10)
    figures = []
    for start in range(0, len(order), tenth):
        part = [ready[uid] - created[uid] for uid in order[start : start + tenth]]
        figures.append([round(statistics.median(part), 2), round(percentile(part, 0.99), 2)])
    return figures


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


def drain(core: k8s.CoreV1Api, namespaces: list[str], timeout: float) -> float:
    """Delete the namespaces and wait until they are gone (not just Terminating); seconds."""
    started = time.monotonic()
    for name in namespaces:
        core.delete_namespace(name)

    def gone(name: str) -> bool:
        try:
            core.read_namespace(name)
        except k8s.ApiException as error:
            if error.status == 404:
                return True
            raise
        return False

    remaining = list(namespaces)

    def all_gone() -> bool:
        remaining[:] = [name for name in remaining if not gone(name)]
        return not remaining

    wait_until(all_gone, timeout=timeout, what=f"namespaces {namespaces} gone")
    return round(time.monotonic() - started, 2)


def wait_for_watchers(admin: k8s.ApiClient, resource: str, count: int, timeout: float) -> float:
    """Wait until `count` watches of `resource` are open at the API server; seconds waited.

    The garbage collector starts watching a new custom resource only at its next
    discovery resync (up to 30 s after the CRD): a run before that sends each change to
    one watcher less, and makes the collector look up owners with GETs instead.
    """
    started = time.monotonic()

    def open_watches() -> float:
        gauge = parse_metric(metrics_text(admin), "apiserver_longrunning_requests")
        return gauge.get(("WATCH", resource), 0.0)

    wait_until(
        lambda: open_watches() >= count, timeout=timeout, what=f"{count} watches of {resource}"
    )
    return round(time.monotonic() - started, 1)


# The controller manager's API client rate in the bench's control plane (see `run`).
GC_API_QPS = 200


def wait_for_quiet_api(admin: k8s.ApiClient, *, timeout: float) -> float:
    """Wait until the API server has served no work requests for 3 s; seconds waited.

    After a drain the garbage collector still looks up the deleted objects' owners and
    dependents for a while; without this wait the next run would pay for those requests.
    """
    started = time.monotonic()
    previous = request_counts_now(admin)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 3.0:
        time.sleep(0.5)
        current = request_counts_now(admin)
        if work_requests(previous, current) > 0:
            quiet_since = time.monotonic()
            if time.monotonic() - started > timeout:
                busy = request_delta(previous, current)
                say(f"the API server was not quiet within {timeout} s ({busy}); going on")
                break
        previous = current
    return round(time.monotonic() - started, 1)


def request_counts_now(admin: k8s.ApiClient) -> dict[RequestKey, float]:
    return scrape_api_server(admin)["requests_per_tr"]


@dataclass
class Bench:
    """What every run shares: one control plane, one token endpoint, one recorder."""

    options: Options
    cluster: ControlPlane
    admin: k8s.ApiClient
    endpoint: TokenEndpoint
    recorder: Recorder
    operator_kubeconfig: Path
    log_dir: Path

    def identity(self) -> Identity:
        return Identity(
            client_id="bench-operator",
            client_secret="bench-secret",
            token_endpoint=self.endpoint.url,
        )

    def operator(self, kind: str, index: int) -> Operator:
        log_file = self.log_dir / (f"run{index}-{kind}.log" if index >= 0 else "warm-up.log")
        if kind == "floor" or (kind == "variant" and self.options.variant_floor):
            return FloorProcess(
                kubeconfig=self.operator_kubeconfig, log_file=log_file, identity=self.identity()
            )
        verbose = ["--verbose"] if self.options.verbose else []
        return OperatorProcess(
            kubeconfig=self.operator_kubeconfig,
            log_file=log_file,
            identity=self.identity(),
            cluster_name="bench",
            args=["--standalone", "--all-namespaces", *verbose],
            settings={
                "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
                "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": f"127.0.0.1:{self.endpoint.port}",
                "M2M_LOG_FORMAT": "text",
                # The operator's identity serves only selected namespaces: here, every one
                # (a selector every namespace matches; ignored by versions without it).
                "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": "kubernetes.io/metadata.name",
                **self.options.settings,
                **(self._variant_environment() if kind == "variant" else {}),
            },
            name="operator",
        )

    def _variant_environment(self) -> dict[str, str]:
        environment = dict(self.options.variant)
        if self.options.variant_tree is not None:
            # Before the installed (editable) tree on the path: that tree's package is run.
            environment["PYTHONPATH"] = str(self.options.variant_tree.resolve() / "operator")
        return environment

    def warm_up(self) -> float:
        """A small floor run, not counted: the first burst on a fresh control plane pays for
        its caches and connections, and whichever operator ran first would be charged."""
        started = time.monotonic()
        self.run("floor", -1, n=min(self.options.n, 200), profile=False, restarts=False)
        return round(time.monotonic() - started, 1)

    def run(
        self, kind: str, index: int, *, n: int, profile: bool, restarts: bool
    ) -> dict[str, Any]:
        """One run of `kind` ("floor", "ours", "variant") in namespaces of its own, drained."""
        options, recorder, endpoint = self.options, self.recorder, self.endpoint
        core = k8s.CoreV1Api(self.admin)
        run_name = f"run{index}" if index >= 0 else "warm-up"
        namespaces = [f"bench-{run_name}-{i:02d}" for i in range(options.namespaces)]
        for name in namespaces:
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        result: dict[str, Any] = {"kind": kind, "run": index, "loadavg_start": loadavg()}
        operator = self.operator(kind, index)
        operator.start(timeout=options.timeout)
        profiler: Profiler | None = None
        try:
            assert operator.pid is not None
            pid = operator.pid
            result["rss_empty_mib"] = round(rss_mib(pid), 1)
            if profile and self.options.profile_dir is not None:
                self.options.profile_dir.mkdir(parents=True, exist_ok=True)
                output = self.options.profile_dir / f"{kind}-burst.txt"
                seconds = self.options.profile_seconds
                rate = 200 if seconds is None else 500
                profiler = Profiler(pid, output, rate=rate, seconds=seconds)
                result["profile"] = str(output)

            # The burst.
            metrics_from = scrape_api_server(self.admin)
            operator_cpu_from = cpu_seconds(pid)
            cluster_cpu_from = control_plane_cpu_seconds(self.cluster)
            tcp_from = tcp_counters()
            started = time.monotonic()
            with CpuSampler(pid, self.cluster) as sampler:
                created = create_token_requests(self.cluster.kubeconfig, namespaces, options, n)
                uids = set(created)
                result["create_seconds"] = round(time.monotonic() - started, 2)
                wait_until(
                    lambda: recorder.count_ready(uids) >= n,
                    timeout=options.timeout,
                    what=f"{n} Ready TokenRequests ({kind})",
                )
            result["cpu_percent_by_tenth"] = sampler.by_tenth()
            result["tcp_during_burst"] = counters_delta(tcp_from, tcp_counters())
            operator_cpu = cpu_seconds(pid) - operator_cpu_from
            cluster_cpu = control_plane_cpu_seconds(self.cluster) - cluster_cpu_from
            with recorder.lock:
                ready = {uid: recorder.ready_at[uid] for uid in uids}
            result["all_ready_s"] = round(max(ready.values()) - started, 2)
            # CPU seconds spent until all were Ready (including the burst's own creates in
            # the control plane): on a shared machine a steadier figure than the seconds.
            result["burst_cpu_s"] = {
                "operator": round(operator_cpu, 2),
                "control_plane": round(cluster_cpu, 2),
            }
            result["operator_cpu_ms_per_tr"] = round(1000 * operator_cpu / n, 2)
            result["control_plane_cpu_ms_per_tr"] = round(1000 * cluster_cpu / n, 2)
            latencies = [ready[uid] - at for uid, at in created.items()]
            result["latency_p50_s"] = round(statistics.median(latencies), 3)
            result["latency_p99_s"] = round(percentile(latencies, 0.99), 3)
            result["latencies"] = latencies  # for the pooled figures; not in the JSON line
            result["latency_by_tenth"] = latency_by_tenth(created, ready)
            result["slowest"] = slowest(created, ready, started=started)
            calls = Counter(endpoint.calls_since(started))
            result["token_calls"] = sum(calls.values())
            result["token_calls_per_scope"] = round(sum(calls.values()) / options.scopes, 3)
            result["rss_loaded_mib"] = round(rss_mib(pid), 1)
            result["loadavg_burst"] = loadavg()

            # Settled: every TokenIssued event posted (ours posts them in the background,
            # after the statuses), then the operator's log quiet for 3 s (Kopf logs a line
            # for every TokenRequest event it handles). The request mix covers the burst
            # up to here, so it includes the events.
            settle_from = time.monotonic()
            wait_until(
                lambda: recorder.count_issued(uids) >= n,
                timeout=options.timeout,
                what=f"{n} TokenIssued events ({kind})",
            )
            result["events_posted_s"] = round(time.monotonic() - started, 2)
            wait_quiet(operator, quiet=3.0, timeout=options.timeout)
            result["settle_s"] = round(time.monotonic() - settle_from, 2)
            if profiler is not None:
                profiler.stop()
                profiler = None
            settled_operator_cpu = cpu_seconds(pid) - operator_cpu_from
            settled_cluster_cpu = control_plane_cpu_seconds(self.cluster) - cluster_cpu_from
            result["settled_operator_cpu_ms_per_tr"] = round(1000 * settled_operator_cpu / n, 2)
            result["settled_control_plane_cpu_ms_per_tr"] = round(1000 * settled_cluster_cpu / n, 2)
            metrics_to = scrape_api_server(self.admin)
            for key in API_SERVER_METRICS:
                result[key] = request_delta(metrics_from[key], metrics_to[key], per=n)
            for key in ("requests_per_tr", "watch_events_per_tr", "watch_event_bytes_per_tr"):
                result[f"{key}_total"] = round(sum(result[key].values()), 2)

            # Idle: nothing is due for the next 40 minutes (1 h tokens).
            idle_from = time.monotonic()
            cpu_from = cpu_seconds(pid)
            time.sleep(
                options.idle_seconds if index >= 0 else 0.0
            )  # measuring a window, not waiting for an outcome
            window = time.monotonic() - idle_from
            cpu = cpu_seconds(pid) - cpu_from
            result["idle_cpu_percent"] = round(100 * cpu / window, 2)
            result["idle_secret_writes"] = recorder.writes_since(idle_from)
            result["idle_token_calls"] = len(endpoint.calls_since(idle_from))
            result["rss_idle_mib"] = round(rss_mib(pid), 1)
            result["loadavg_idle"] = loadavg()

            if restarts:
                assert isinstance(operator, OperatorProcess)
                result.update(self.restarts(operator))
            result["loadavg_end"] = loadavg()
        finally:
            if profiler is not None:
                profiler.stop()
            operator.stop()
            result["operator_log"] = str(operator.log_file)
        result["drain_s"] = drain(core, namespaces, options.timeout)
        # A run's leftovers (the garbage collector's reads) must not be the next run's cost.
        quiet_timeout = 60.0 + 2 * n / GC_API_QPS
        result["quiet_after_drain_s"] = wait_for_quiet_api(self.admin, timeout=quiet_timeout)
        return result

    def restarts(self, operator: OperatorProcess) -> dict[str, Any]:
        """Restart without, then with, unrelated Secrets in the cluster (ours only)."""
        options = self.options
        result: dict[str, Any] = {}
        result["restart"] = restart(
            operator, self.endpoint, self.recorder, options.n, options.timeout
        )
        if options.unrelated:
            core = k8s.CoreV1Api(self.admin)
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="unrelated")))
            made = time.monotonic()
            create_unrelated_secrets(self.cluster.kubeconfig, "unrelated", options)
            result["unrelated_create_s"] = round(time.monotonic() - made, 1)
            result["restart_with_unrelated"] = restart(
                operator, self.endpoint, self.recorder, options.n, options.timeout
            )
            without = float(result["restart"]["rss_mib"])
            with_them = float(result["restart_with_unrelated"]["rss_mib"])
            result["rss_unrelated_ratio"] = round(with_them / without, 3)
            drain(core, ["unrelated"], options.timeout)
        return result


# Figures compared per pair: (key in a run's result, label, unit).
FIGURES = (
    ("create_seconds", "creating them took (8 threads)", "s"),
    ("all_ready_s", "all Ready (from the first create)", "s"),
    ("latency_p50_s", "create -> Ready p50", "s"),
    ("latency_p99_s", "create -> Ready p99", "s"),
    ("operator_cpu_ms_per_tr", "operator CPU per TR, until all Ready", "ms"),
    ("settled_operator_cpu_ms_per_tr", "operator CPU per TR, until events posted", "ms"),
    ("control_plane_cpu_ms_per_tr", "control-plane CPU per TR, until all Ready", "ms"),
    ("settled_control_plane_cpu_ms_per_tr", "control-plane CPU per TR, until events", "ms"),
    ("requests_per_tr_total", "API requests per TR (all clients)", ""),
    ("watch_events_per_tr_total", "watch events sent per TR (all watchers)", ""),
    ("watch_event_bytes_per_tr_total", "watch event bytes sent per TR", "B"),
    ("events_posted_s", "all events posted", "s"),
    ("rss_empty_mib", "RSS empty", "MiB"),
    ("rss_loaded_mib", "RSS loaded", "MiB"),
    ("rss_idle_mib", "RSS idle", "MiB"),
    ("idle_cpu_percent", "idle CPU", "%"),
    ("token_calls_per_scope", "token calls per scope", ""),
)


def compare(runs: list[dict[str, Any]], kind: str = "ours") -> dict[str, Any]:
    """Per figure: the floor's values, ours (or the variant's), and their ratio for each
    pair, in run order (under "ours" either way)."""
    floors = [run for run in runs if run["kind"] == "floor"]
    ours = [run for run in runs if run["kind"] == kind]
    comparison: dict[str, Any] = {}
    for key, _label, _unit in FIGURES:
        comparison[key] = {
            "floor": [run[key] for run in floors],
            "ours": [run[key] for run in ours],
            "ratio": [ratio(o[key], f[key]) for f, o in zip(floors, ours, strict=True)],
        }
    # One pair's p99 is its 10 slowest of 1,000, all in the burst's first fifth, where the
    # machine is busiest: the floor's own p99 varied 0.27-0.84 s between runs of one hour.
    # Pooled over every pair, the percentile is taken over all their TokenRequests.
    for key, row in pooled_figures(floors, ours).items():
        comparison[key] = {name: [value] for name, value in row.items()}
    return comparison


# Latency percentiles over the TokenRequests of all pairs: (key, fraction).
POOLED = (("latency_pooled_p50_s", 0.5), ("latency_pooled_p99_s", 0.99))


def _pooled(runs: list[dict[str, Any]]) -> list[float]:
    return [latency for run in runs for latency in run["latencies"]]


def pooled_figures(
    floors: list[dict[str, Any]], ours: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per POOLED key: the percentile over all the floor runs' TokenRequests, over all
    ours', and their ratio."""
    figures: dict[str, dict[str, Any]] = {}
    for key, fraction in POOLED:
        floor_value = round(percentile(_pooled(floors), fraction), 3)
        our_value = round(percentile(_pooled(ours), fraction), 3)
        figures[key] = {
            "floor": floor_value,
            "ours": our_value,
            "ratio": ratio(our_value, floor_value),
        }
    return figures


def against_every_floor(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """With --variant-floor: ours' pooled latencies against those of every floor run (the
    floor's and the A/A variant's), a yardstick of twice the runs and so less noise."""
    floors = [run for run in runs if run["kind"] in ("floor", "variant")]
    ours = [run for run in runs if run["kind"] == "ours"]
    return {"floor_runs": len(floors), **pooled_figures(floors, ours)}


def figure_table(comparison: dict[str, Any], pairs: int, column: str) -> list[str]:
    """The figures of one kind against the floor, a row each."""
    lines = [f"{'figure':<46} {'floor':>16} {column:>16} {column + '/floor':>12}"]
    for key, label, unit in FIGURES:
        row = comparison[key]
        ratios = [r for r in row["ratio"] if r is not None]
        shown = f"{min(ratios):.2f}-{max(ratios):.2f}" if len(set(ratios)) > 1 else spread(ratios)
        title = f"{label} ({unit})" if unit else label
        lines.append(
            f"{title:<46} {spread(row['floor']):>16} {spread(row['ours']):>16} {shown:>12}"
        )
    for key, title in (("latency_pooled_p50_s", "p50"), ("latency_pooled_p99_s", "p99")):
        row = comparison[key]
        label = f"create -> Ready {title}, {pairs} pair(s) pooled (s)"
        shown = spread([r for r in row["ratio"] if r is not None])
        lines.append(
            f"{label:<46} {spread(row['floor']):>16} {spread(row['ours']):>16} {shown:>12}"
        )
    return lines


def report(result: dict[str, Any]) -> list[str]:
    """The human-readable lines printed before the JSON line."""
    comparison, runs, pairs = result["comparison"], result["runs"], result["pairs"]
    lines = [
        f"{result['n']} TokenRequests, {result['scopes']} scopes, {result['namespaces']} "
        f"namespaces, {pairs} pair(s), {result['cpus']} CPUs, "
        f"load {result['loadavg_start']} at start",
        *figure_table(comparison, pairs, "ours"),
    ]
    if "variant_comparison" in result:
        described = [f"{k}={v}" for k, v in sorted(result["variant_settings"].items())]
        if result["variant_tree"] is not None:
            described.insert(0, f"the operator of {result['variant_tree']}")
        if result.get("variant_floor"):
            lines.append("variant: the floor again (A/A), in the same rounds")
            every = result["against_every_floor"]
            for key, title in (("latency_pooled_p50_s", "p50"), ("latency_pooled_p99_s", "p99")):
                row = every[key]
                lines.append(
                    f"ours against all {every['floor_runs']} floor runs pooled, create -> Ready "
                    f"{title}: {row['ours']} against {row['floor']} s: {row['ratio']}"
                )
        else:
            lines.append(f"variant: ours with {', '.join(described)}, in the same rounds")
        lines.extend(figure_table(result["variant_comparison"], pairs, "variant"))
    floors = [run for run in runs if run["kind"] == "floor"]
    ours = [run for run in runs if run["kind"] == "ours"]
    for metric, title in (
        ("requests_per_tr", "API requests"),
        ("request_bytes_per_tr", "request body bytes"),
        ("response_bytes_per_tr", "response bytes"),
        ("watch_events_per_tr", "watch events sent"),
        ("watch_event_bytes_per_tr", "watch event bytes sent"),
    ):
        lines.append(f"{title} per TokenRequest, burst to settled (floor | ours, per run):")
        largest = max(
            (v for run in runs for k, v in run[metric].items() if not k.startswith("WATCH ")),
            default=0.0,
        )
        for key in sorted({k for run in runs for k in run[metric]}):
            # The controllers' own watches and heartbeats, a few per run: in the JSON only.
            if max(run[metric].get(key, 0.0) for run in runs) < largest / 100:
                continue
            # A watch's response is counted when it ends, whenever that is: not the burst's.
            if metric == "response_bytes_per_tr" and key.startswith("WATCH "):
                continue
            floor_values = spread([run[metric].get(key, 0.0) for run in floors])
            our_values = spread([run[metric].get(key, 0.0) for run in ours])
            lines.append(f"  {key:<44} {floor_values:>16} {our_values:>16}")
    for run in runs:
        tenths = " ".join(f"{p50}/{p99}" for p50, p99 in run["latency_by_tenth"])
        lines.append(f"{run['kind']} run {run['run']} p50/p99 (s) by tenth of the burst: {tenths}")
        if "slowest" in run:
            slow = " ".join(f"{at}+{took}" for at, took in run["slowest"])
            lines.append(f"  slowest (created at + took, s): {slow}")
        shares = " ".join("/".join(map(str, tenth)) for tenth in run["cpu_percent_by_tenth"])
        lines.append(
            "  % of a core by tenth (operator/control plane/bench/operator's loop thread"
            f" running/waiting for a core): {shares}"
        )
    for run in runs:
        if run["kind"] == "floor":
            continue
        lines.append(
            f"{run['kind']} run {run['run']}: idle writes {run['idle_secret_writes']}, "
            f"idle token calls {run['idle_token_calls']}"
        )
        for name in ("restart", "restart_with_unrelated"):
            if name in run:
                r = run[name]
                lines.append(
                    f"  {name}: token calls {r['token_calls']}, Secret writes "
                    f"{r['secret_writes']}, all looked at in {r['seconds_to_look_at_all']} s, "
                    f"RSS {r['rss_mib']} MiB"
                )
        if "rss_unrelated_ratio" in run:
            lines.append(f"  RSS with / without unrelated Secrets: {run['rss_unrelated_ratio']}")
    return lines


def run(options: Options) -> dict[str, Any]:
    result: dict[str, Any] = {
        "n": options.n,
        "scopes": options.scopes,
        "namespaces": options.namespaces,
        "pairs": options.pairs,
        "unrelated_secrets": options.unrelated,
        "unrelated_secret_bytes": options.unrelated_size,
        "idle_window_s": options.idle_seconds,
        "endpoint_latency_s": options.latency,
        "ours_settings": options.settings,
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "profiled": options.profile_dir is not None,
    }
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="m2m-scale-bench-"))
    result["log_dir"] = str(log_dir)
    with (
        # The garbage collector deletes a drained run's Secrets at the controller manager's
        # client rate (20 requests/s by default): 10,000 of them kept the API server busy
        # into the next run for 400 s. Raised, they are gone before the next run starts.
        ControlPlane(
            extra_controller_manager_args=(
                f"--kube-api-qps={GC_API_QPS}",
                f"--kube-api-burst={2 * GC_API_QPS}",
            )
        ) as cluster,
        TokenEndpoint(latency=options.latency) as endpoint,
        cluster.api_client() as admin,
    ):
        install_operator(admin)
        recorder = Recorder()
        start_recording(cluster.kubeconfig, recorder)
        # The bench's own watch and the garbage collector's, before any run.
        result["gc_watch_wait_s"] = wait_for_watchers(admin, PLURAL, 2, timeout=120.0)
        bench = Bench(
            options=options,
            cluster=cluster,
            admin=admin,
            endpoint=endpoint,
            recorder=recorder,
            operator_kubeconfig=cluster.service_account_kubeconfig(
                OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, expiration_seconds=4 * 3600
            ),
            log_dir=log_dir,
        )
        runs: list[dict[str, Any]] = []
        order = ["floor", "ours", *(["variant"] if options.with_variant else [])] * options.pairs
        # Restarts are ours' (or the variant operator's) to show, in the last run of one.
        restarting = max(
            index
            for index, kind in enumerate(order)
            if kind == "ours" or (kind == "variant" and not options.variant_floor)
        )
        try:
            say(f"warm-up: the floor, {min(options.n, 200)} TokenRequests")
            result["warm_up_s"] = bench.warm_up()
            for index, kind in enumerate(order):
                say(f"run {index}: {kind}, {options.n} TokenRequests")
                runs.append(
                    bench.run(
                        kind,
                        index,
                        n=options.n,
                        profile=index < 2,
                        restarts=index == restarting,
                    )
                )
                say(
                    f"run {index}: {kind}: all Ready {runs[-1]['all_ready_s']} s, "
                    f"p99 {runs[-1]['latency_p99_s']} s, "
                    f"{runs[-1]['operator_cpu_ms_per_tr']} ms CPU per TR, "
                    f"TCP {runs[-1]['tcp_during_burst']}"
                )
        finally:
            recorder.stop.set()
    result["runs"] = runs
    result["comparison"] = compare(runs)
    if options.with_variant:
        result["variant_settings"] = options.variant
        result["variant_tree"] = None if options.variant_tree is None else str(options.variant_tree)
        result["variant_floor"] = options.variant_floor
        result["variant_comparison"] = compare(runs, "variant")
        if options.variant_floor:
            result["against_every_floor"] = against_every_floor(runs)
    result["loadavg_end"] = loadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    result = run(options)
    for line in report(result):
        print(line)
    if options.log_dir is not None:  # each TokenRequest's latency, for a later look
        latencies = {
            f"run{each['run']}-{each['kind']}": each["latencies"] for each in result["runs"]
        }
        (options.log_dir / "latencies.json").write_text(json.dumps(latencies))
    for each in result["runs"]:
        del each["latencies"]
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
