"""What the operator's own TokenRequest watch (presence.py) costs the API server.

Why: the watch that notices deletions Kopf's re-list misses is one more watcher of
every TokenRequest change; another team measures per-TokenRequest CPU against a
minimal operator. This puts a figure on it, against a baseline in the same run.

What it runs, all on 127.0.0.1: a real kube-apiserver + etcd (+ controller
manager) with the shipped CRD (`devenv.controlplane`, `devenv.install`), and in
this process a full-object watch of TokenRequests in every phase (standing in
for Kopf's). Phases alternate WITHOUT and WITH presence.py's metadata-only
watch; each creates N TokenRequests in a fresh namespace, writes each one's
status W times (the operator's JSON Patch with its uid test) and deletes them.
Figures per phase: control-plane CPU (etcd, kube-apiserver, controller
manager: utime+stime from /proc) per TokenRequest, the presence watch thread's
own CPU, and the uids it reported gone (must be N).

    PYTHONPATH=. .venv/bin/python bench/presence_bench.py --n 300 --writes 3 --rounds 2

Prints ONE JSON line. The machine may be shared: the load average is in it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import kubernetes

from devenv.controlplane import ControlPlane
from devenv.install import install_operator
from m2m_token_operator.api.constants import GROUP, PLURAL, VERSION
from m2m_token_operator.kube import presence
from m2m_token_operator.kube.reflector import LabelSelectedWatch

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def thread_cpu_seconds(prefix: str) -> float:
    total = 0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.native_id is not None:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def workload(api: kubernetes.client.ApiClient, namespace: str, n: int, writes: int) -> None:
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    body: Any = {"metadata": {"name": namespace}}
    core.create_namespace(body)

    def one(index: int) -> None:
        name = f"tr-{index}"
        created = custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "TokenRequest",
                "metadata": {"name": name},
                "spec": {"scope": f"api://bench-{index % 10}/.default"},
            },
        )
        uid = created["metadata"]["uid"]
        for write in range(writes):
            patch: Any = [
                {"op": "test", "path": "/metadata/uid", "value": uid},
                {"op": "add", "path": "/status", "value": {"failedAttempts": write}},
            ]
            custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                patch,
                _content_type="application/json-patch+json",
            )
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


async def phase(
    cluster: ControlPlane, *, with_presence: bool, n: int, writes: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gone: list[str] = []
    events = {"full": 0}

    def on_gone(namespace: str, name: str, uid: str, *, why: str) -> None:
        gone.append(uid)

    def count_full(kind: str, obj: dict[str, Any]) -> None:
        events["full"] += 1

    watch_api = cluster.api_client()
    custom = kubernetes.client.CustomObjectsApi(watch_api)
    watches = [
        LabelSelectedWatch(  # stands in for Kopf's full-object watch, in both phases
            name="bench-full",
            lister=lambda **a: custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **a),
            label_selector="",
            on_event=count_full,
        )
    ]
    if with_presence:
        watches += presence.build(watch_api, on_gone, environ={})[1]
    tasks = [asyncio.create_task(w.run()) for w in watches]
    for w in watches:
        await w.synced.wait()
    pids = cluster.process_ids()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with cluster.api_client() as api:
        control_before = cpu_seconds(pids)
        watch_before = thread_cpu_seconds("watch-tokenrequests")
        started = time.monotonic()
        await loop.run_in_executor(None, workload, api, namespace, n, writes)
        expected = n * (2 + writes)  # ADDED, W x MODIFIED, DELETED
        while events["full"] < expected or (with_presence and len(gone) < n):
            if time.monotonic() - started > 300:
                break
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        control = cpu_seconds(pids) - control_before
        watch_cpu = thread_cpu_seconds("watch-tokenrequests") - watch_before
        kubernetes.client.CoreV1Api(api).delete_namespace(namespace)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    watch_api.close()
    return {
        "presence": with_presence,
        "seconds": round(elapsed, 2),
        "control_plane_cpu_s": round(control, 2),
        "control_plane_cpu_ms_per_tokenrequest": round(1000 * control / n, 2),
        "presence_thread_cpu_s": round(watch_cpu, 2),
        "full_watch_events": events["full"],
        "gone_reported": len(gone),
    }


async def run(n: int, writes: int, rounds: int) -> dict[str, Any]:
    with ControlPlane() as cluster:
        with cluster.api_client() as api:
            install_operator(api)
        phases = []
        for _ in range(rounds):
            for with_presence in (False, True):
                phases.append(await phase(cluster, with_presence=with_presence, n=n, writes=writes))
    without = [p["control_plane_cpu_ms_per_tokenrequest"] for p in phases if not p["presence"]]
    with_ = [p["control_plane_cpu_ms_per_tokenrequest"] for p in phases if p["presence"]]
    return {
        "n": n,
        "status_writes_each": writes,
        "phases": phases,
        "control_plane_cpu_ms_per_tokenrequest_without": round(sum(without) / len(without), 2),
        "control_plane_cpu_ms_per_tokenrequest_with": round(sum(with_) / len(with_), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="TokenRequests per phase (300)")
    parser.add_argument("--writes", type=int, default=3, help="status writes each (3)")
    parser.add_argument("--rounds", type=int, default=2, help="without/with pairs (2)")
    arguments = parser.parse_args()
    figures = asyncio.run(run(arguments.n, arguments.writes, arguments.rounds))
    figures["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
