"""The operator's CPU per API call: the async client against the blocking one it replaced.

Sends the same Secret creates (POST with `fieldManager`, a JSON body, a JSON answer
read to its end) to an HTTP server in another process (its CPU is not ours), with
the same concurrency (4) and the same priority gate, through

- baseline: the blocking `kubernetes` client on a 4-thread pool, as
  `KubeCalls._call` did before issue #21 (`run_in_executor`, `_preload_content=False`);
- async: `KubeApi.create_secret` (aiohttp on the event loop).

Prints the process CPU time and the wall time per call of each, measured in the
same run, alternating rounds. Plain HTTP on loopback: TLS would add the same
per-byte cost to both.

    .venv/bin/python bench/kube_client_bench.py [calls per round, default 2000]
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes

from m2m_token_operator.kube.call_priority import PriorityGate
from m2m_token_operator.kube.kube_api import SECRET_FIELD_MANAGER, KubeApi

CONCURRENCY = 4
ROUNDS = 3

SERVER = textwrap.dedent(
    """
    import sys
    from aiohttp import web

    async def answer(request):
        body = await request.read()
        return web.Response(body=body, content_type="application/json", status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
    """
)


def _secret(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"orders-api-{index}",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/managed-by": "m2m-token-operator"},
            "annotations": {"m2m.dev/key-id": "k" * 43, "m2m.dev/seal": "s" * 43},
        },
        "type": "Opaque",
        "data": {"token": "dG9r" * 300, "expires-at": "MjAyNi0xMi0wNlQxMDowMDowMFo="},
    }


async def _round(create: Callable[[int], Awaitable[object]], calls: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call, `calls` creates with CONCURRENCY in flight."""
    next_index = iter(range(calls))

    async def worker() -> None:
        for index in next_index:
            await create(index)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY * 4)))
    return (
        (time.process_time() - cpu) * 1000 / calls,
        (time.perf_counter() - wall) * 1000 / calls,
    )


class BlockingBaseline:
    """The replaced plumbing: a priority gate in front of a thread pool of client calls."""

    def __init__(self, host: str) -> None:
        configuration = kubernetes.client.Configuration()
        configuration.host = host
        configuration.retries = 1
        self._client = kubernetes.client.ApiClient(configuration)
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._executor = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="kube-api")
        self._gate = PriorityGate(CONCURRENCY)

    def _blocking(self, body: dict[str, Any]) -> bytes:
        response = self._core.create_namespaced_secret(
            "shop",
            body,
            field_manager=SECRET_FIELD_MANAGER,
            _preload_content=False,
            _request_timeout=(10.0, 30.0),
        )
        try:
            data: bytes = response.data
        finally:
            response.release_conn()
        return data

    async def create(self, index: int) -> object:
        async with self._gate.slot(0.0):
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(self._executor, self._blocking, _secret(index))
        return json.loads(answer)

    def close(self) -> None:
        self._executor.shutdown()
        self._client.close()  # type: ignore[no-untyped-call]


async def _main(calls: int, host: str) -> None:
    baseline = BlockingBaseline(host)
    configuration = kubernetes.client.Configuration()
    configuration.host = host
    kube = KubeApi(kubernetes.client.ApiClient(configuration), max_workers=CONCURRENCY)

    async def async_create(index: int) -> object:
        return await kube.create_secret("shop", _secret(index))

    figures: dict[str, list[tuple[float, float]]] = {"baseline (threads)": [], "async": []}
    try:
        await _round(baseline.create, 200)  # warm both: connections, imports, caches
        await _round(async_create, 200)
        for _ in range(ROUNDS):
            figures["baseline (threads)"].append(await _round(baseline.create, calls))
            figures["async"].append(await _round(async_create, calls))
    finally:
        baseline.close()
        await kube.aclose()
    print(f"{calls} Secret creates per round, {ROUNDS} rounds, {CONCURRENCY} in flight")
    print(f"{'client':<20} {'CPU ms/call (min, median)':>28} {'wall ms/call (median)':>24}")
    for name, rounds in figures.items():
        cpu = sorted(c for c, _ in rounds)
        wall = sorted(w for _, w in rounds)
        median_cpu, median_wall = cpu[len(cpu) // 2], wall[len(wall) // 2]
        print(f"{name:<20} {cpu[0]:>13.3f} {median_cpu:>13.3f} {median_wall:>24.3f}")
    base = sorted(c for c, _ in figures["baseline (threads)"])[ROUNDS // 2]
    new = sorted(c for c, _ in figures["async"])[ROUNDS // 2]
    print(f"async / baseline CPU per call: {new / base:.2f}")


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        asyncio.run(_main(calls, f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
