"""Owned Secrets on a real control plane: other people's labelled Secrets, and a kill mid-burst.

Why a benchmark of its own (issues 18 and 17, item 7): both figures are about
what the operator's Secret watch holds and when it seeds the token cache, which
only shows with the whole operator, its watches and a real API server.

`forged` (issue 18): the same scenario twice, each on a fresh control plane,
without and then with F labelled Secrets of S bytes that are not ours (no owner
reference; the managed-by label anyone can set) in a namespace the operator
serves, created before the operator starts: N TokenRequests over K scopes at
once, all Ready (peak RSS "at start"), then a restart until the operator has
looked at every TokenRequest again (peak RSS of the new process, token calls
and Secret writes of the restart). Peak RSS is the kernel's high-water mark
(VmHWM), so a list parsed and dropped still counts. The goal: with them within
10 % of without, at start and after the restart; the restart costs 0 calls and
0 writes.

`kill` (issue 17, item 7): N TokenRequests over K scopes at once, then the
operator is SIGKILLed once a fraction of them (`--kill-at`, half) are Ready and
started again; token calls per scope until all are Ready (goal: at most 1.10;
1.00 is the floor). Their names are shuffled against their creation order (the
API server lists by name), so after the restart the operator meets a key's
TokenRequests without a Secret as often as those with one first. The baseline in
the same run: the same burst on other scopes without a kill. The restart also
looks at the baseline's TokenRequests again: their calls after the restart are
printed too (goal 0).

    PYTHONPATH=. .venv/bin/python bench/owned_secrets_bench.py forged
    PYTHONPATH=. .venv/bin/python bench/owned_secrets_bench.py kill
    # the same against another checkout's operator (say, main), for a before figure:
    PYTHONPATH=. .venv/bin/python bench/owned_secrets_bench.py forged \
        --operator-path /work/main/operator

Prints ONE JSON line per run. Not part of `make test`: `make bench-owned-secrets`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from bench.scale_bench import (
    GROUP,
    LOOKED,
    PLURAL,
    VERSION,
    Recorder,
    TokenEndpoint,
    _pool,
    loadavg,
    rss_mib,
    start_recording,
    wait_until,
)
from devenv.controlplane import ControlPlane, new_api_client
from devenv.install import OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, install_operator
from devenv.operatorprocess import Identity, OperatorProcess

NAMESPACES = ("bench-00", "bench-01", "bench-02")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM): what a memory limit meets."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmHWM for pid {pid}")


def token_request_names(
    *, prefix: str, n: int, namespaces: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(namespace, name) in the order of creation. The names are shuffled: the API server
    lists by name, so after a restart the operator meets a key's TokenRequests in another
    order than they were created (and became Ready) in, as with names people choose."""
    suffixes = list(range(n))
    random.Random(prefix).shuffle(suffixes)
    return [
        (namespaces[index % len(namespaces)], f"{prefix}-{suffixes[index]:05d}")
        for index in range(n)
    ]


def create_token_requests(
    kubeconfig: Path, *, prefix: str, n: int, scopes: int, namespaces: tuple[str, ...]
) -> list[tuple[str, str]]:
    """N TokenRequests over `scopes` scopes (named after `prefix`), from 8 client threads."""
    local = threading.local()
    names = token_request_names(prefix=prefix, n=n, namespaces=namespaces)

    def create(index: int) -> tuple[str, str]:
        if not hasattr(local, "api"):
            local.api = k8s.CustomObjectsApi(new_api_client(kubeconfig))
        namespace, name = names[index]
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TokenRequest",
            "metadata": {"name": name},
            "spec": {"scope": f"api://{prefix}-{index % scopes:04d}/.default"},
        }
        local.api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        return namespace, name

    with _pool(8) as pool:
        return list(pool.map(create, range(n)))


def create_forged_secrets(kubeconfig: Path, namespace: str, count: int, size: int) -> None:
    """Secrets carrying our label, not ours: no owner reference, someone else's data."""
    local = threading.local()
    payload = base64.b64encode(os.urandom(size)).decode()

    def create(index: int) -> None:
        if not hasattr(local, "api"):
            local.api = k8s.CoreV1Api(new_api_client(kubeconfig))
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": f"forged-{index:04d}",
                "labels": {"app.kubernetes.io/managed-by": "m2m-token-operator"},
            },
            "data": {"blob": payload},
        }
        local.api.create_namespaced_secret(namespace, body, _preload_content=False)

    with _pool(4) as pool:
        list(pool.map(create, range(count)))


class Cluster:
    """A control plane with the operator installed, a token endpoint and a recorder."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args = args
        self.name = name

    def __enter__(self) -> Cluster:
        self._plane = ControlPlane()
        self.cluster = self._plane.__enter__()
        self.endpoint = TokenEndpoint(latency=self.args.latency).__enter__()
        self._admin = self.cluster.api_client()
        admin = self._admin.__enter__()  # type: ignore[no-untyped-call]
        install_operator(admin)
        core = k8s.CoreV1Api(admin)
        for namespace in NAMESPACES:
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
        self.recorder = Recorder()
        start_recording(self.cluster.kubeconfig, self.recorder)
        log_dir = self.args.log_dir or Path(tempfile.mkdtemp(prefix="m2m-owned-bench-"))
        settings = {
            "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
            "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": f"127.0.0.1:{self.endpoint.port}",
            "M2M_LOG_FORMAT": "text",
            "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": "kubernetes.io/metadata.name",
        }
        if self.args.operator_path:
            settings["PYTHONPATH"] = str(self.args.operator_path)
        self.operator = OperatorProcess(
            kubeconfig=self.cluster.service_account_kubeconfig(
                OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, expiration_seconds=4 * 3600
            ),
            log_file=log_dir / f"operator-{self.name}.log",
            identity=Identity(
                client_id="bench-operator",
                client_secret="bench-secret",
                token_endpoint=self.endpoint.url,
            ),
            cluster_name="bench",
            args=["--standalone", "--all-namespaces"],
            settings=settings,
            name="operator",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.recorder.stop.set()
        self.operator.stop()
        self._admin.__exit__(*exc)  # type: ignore[no-untyped-call]
        self.endpoint.__exit__(*exc)
        self._plane.__exit__(*exc)

    def ready(self, refs: list[tuple[str, str]]) -> int:
        with self.recorder.lock:
            return sum(1 for ref in refs if ref in self.recorder.ready_at)

    def wait_ready(self, refs: list[tuple[str, str]]) -> None:
        wait_until(
            lambda: self.ready(refs) >= len(refs),
            timeout=self.args.timeout,
            what=f"{len(refs)} Ready TokenRequests",
        )

    def start_and_look_at(self, count: int) -> float:
        """Start the operator; wait until it has looked at `count` TokenRequests; when it began."""
        since = time.monotonic()
        log_from = self.operator.log_size()
        self.operator.start(timeout=self.args.timeout)
        wait_until(
            lambda: len(set(LOOKED.findall(self.operator.log_text()[log_from:]))) >= count,
            timeout=self.args.timeout,
            what=f"a look at all {count} TokenRequests",
        )
        return since


def forged_scenario(args: argparse.Namespace, forged: int) -> dict[str, Any]:
    with Cluster(args, f"forged-{forged}") as bench:
        result: dict[str, Any] = {"forged_secrets": forged}
        if forged:
            made = time.monotonic()
            create_forged_secrets(bench.cluster.kubeconfig, NAMESPACES[0], forged, args.size)
            result["forged_create_s"] = round(time.monotonic() - made, 1)
        bench.operator.start(timeout=args.timeout)
        assert bench.operator.pid is not None
        started = time.monotonic()
        refs = create_token_requests(
            bench.cluster.kubeconfig,
            prefix="tr",
            n=args.n,
            scopes=args.scopes,
            namespaces=NAMESPACES[:2],
        )
        bench.wait_ready(refs)
        result["all_ready_s"] = round(time.monotonic() - started, 2)
        result["start_peak_rss_mib"] = peak_rss_mib(bench.operator.pid)
        result["start_token_calls"] = len(bench.endpoint.calls_since(started))
        bench.operator.stop()
        since = bench.start_and_look_at(args.n)
        assert bench.operator.pid is not None
        result["restart_peak_rss_mib"] = peak_rss_mib(bench.operator.pid)
        result["restart_token_calls"] = len(bench.endpoint.calls_since(since))
        result["restart_secret_writes"] = bench.recorder.writes_since(since)
        result["operator_log"] = str(bench.operator.log_file)
        return result


def run_forged(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "mode": "forged",
        "n": args.n,
        "scopes": args.scopes,
        "forged_secret_bytes": args.size,
        "operator": str(args.operator_path or "this checkout"),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
    }
    without = forged_scenario(args, 0)
    with_them = forged_scenario(args, args.forged)
    result["without"] = without
    result["with_forged"] = with_them
    for phase in ("start", "restart"):
        key = f"{phase}_peak_rss_mib"
        result[f"{phase}_rss_ratio"] = round(with_them[key] / without[key], 3)
    result["loadavg_end"] = loadavg()
    return result


def run_kill(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "mode": "kill",
        "n": args.n,
        "scopes": args.scopes,
        "operator": str(args.operator_path or "this checkout"),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
    }
    with Cluster(args, "kill") as bench:
        bench.operator.start(timeout=args.timeout)
        # Baseline: the same burst, no kill.
        started = time.monotonic()
        baseline = create_token_requests(
            bench.cluster.kubeconfig,
            prefix="base",
            n=args.n,
            scopes=args.scopes,
            namespaces=NAMESPACES,
        )
        bench.wait_ready(baseline)
        calls = Counter(bench.endpoint.calls_since(started))
        result["baseline_calls_per_scope"] = round(sum(calls.values()) / args.scopes, 3)
        result["baseline_all_ready_s"] = round(time.monotonic() - started, 2)

        # The burst, killed once half of it is Ready.
        started = time.monotonic()
        burst: list[tuple[str, str]] = []
        creator = threading.Thread(
            target=lambda: burst.extend(
                create_token_requests(
                    bench.cluster.kubeconfig,
                    prefix="kill",
                    n=args.n,
                    scopes=args.scopes,
                    namespaces=NAMESPACES,
                )
            )
        )
        creator.start()
        names = token_request_names(prefix="kill", n=args.n, namespaces=NAMESPACES)
        wait_until(
            lambda: bench.ready(names) >= int(args.n * args.kill_at),
            timeout=args.timeout,
            what=f"{args.kill_at:.0%} of the burst Ready",
        )
        result["ready_at_kill"] = bench.ready(names)
        bench.operator.kill()
        killed = time.monotonic()
        creator.join()
        bench.operator.start(timeout=args.timeout)
        bench.wait_ready(names)
        result["kill_all_ready_s"] = round(time.monotonic() - started, 2)
        scopes = Counter(scope for scope in bench.endpoint.calls_since(started))
        kill_calls = sum(n for scope, n in scopes.items() if "//kill-" in scope)
        result["kill_calls_per_scope"] = round(kill_calls / args.scopes, 3)
        result["kill_calls_after_restart"] = sum(
            1 for scope in bench.endpoint.calls_since(killed) if "//kill-" in scope
        )
        # The baseline's TokenRequests were looked at again after the kill: no call for them.
        result["baseline_calls_after_restart"] = sum(
            n for scope, n in scopes.items() if "//base-" in scope
        )
        result["rss_mib"] = round(rss_mib(bench.operator.pid or 0), 1)
        result["operator_log"] = str(bench.operator.log_file)
    result["loadavg_end"] = loadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("forged", "kill"))
    parser.add_argument("--n", type=int, default=None, help="TokenRequests (100 / 300)")
    parser.add_argument("--scopes", type=int, default=None, help="scopes (10 / 30)")
    parser.add_argument("--forged", type=int, default=300, help="labelled Secrets not ours")
    parser.add_argument(
        "--size", type=int, default=1_000_000, help="bytes per forged Secret (about 1 MiB)"
    )
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="kill once this fraction is Ready (0.5)"
    )
    parser.add_argument("--latency", type=float, default=0.05, help="token endpoint latency")
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase (s)")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the operator's logs")
    parser.add_argument(
        "--operator-path",
        type=Path,
        default=None,
        help="PYTHONPATH for the operator process (another checkout's operator/)",
    )
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 100 if args.mode == "forged" else 300
    if args.scopes is None:
        args.scopes = 10 if args.mode == "forged" else 30
    result = run_forged(args) if args.mode == "forged" else run_kill(args)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
