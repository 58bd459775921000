"""How cheap a cache hit is, and how many calls the token endpoint sees under a stampede.

Runs against a real token endpoint on loopback (http.server in a thread, with a
small latency so that concurrent callers really overlap) through the real
TokenClient and TokenCache. Exits non-zero when 1,000 concurrent callers asking
for 10 keys cause anything but exactly 10 requests.

    .venv/bin/python bench/cache_bench.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from m2m_token_operator.tokens.cache import Freshness, TokenCache
from m2m_token_operator.tokens.client import TokenClient
from m2m_token_operator.tokens.credentials import secret_credentials
from m2m_token_operator.tokens.timing import RefreshPolicy, RetryPolicy

HIT_GETS = 100_000
CALLERS = 1_000
KEYS = 10
LATENCY = 0.02  # seconds the token endpoint takes to answer


class TokenEndpoint(BaseHTTPRequestHandler):
    requests_served = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        time.sleep(LATENCY)
        with TokenEndpoint.lock:
            TokenEndpoint.requests_served += 1
            number = TokenEndpoint.requests_served
        body = json.dumps(
            {"token_type": "Bearer", "expires_in": 3599, "access_token": f"bench-token-{number}"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass  # one line per request would drown the figures


def utc_now() -> datetime:
    return datetime.now(UTC)


def scope(index: int) -> str:
    return f"api://bench.default.app-{index}/.default"


async def measure(endpoint: str) -> int:
    client = TokenClient(connect_timeout=2, read_timeout=5)
    credentials = secret_credentials(
        token_endpoint=endpoint,
        client_id="bench-client",
        client_secret="bench-secret",
        source="operator identity",
    )
    cache = TokenCache(
        fetch=client.fetch,
        refresh_policy=RefreshPolicy(),
        retry_policy=RetryPolicy(),
        clock=utc_now,
        max_requests=8,
    )
    try:
        # 1,000 callers at once, 100 per key, on a cold cache.
        started = time.perf_counter()
        results = await asyncio.gather(
            *(cache.get(credentials, scope(i % KEYS)) for i in range(CALLERS))
        )
        stampede = time.perf_counter() - started
        requests = TokenEndpoint.requests_served
        tokens = {result.token.value for result in results if result.token is not None}
        served = sum(result.freshness is Freshness.FRESH for result in results)

        # Hits: the same caller asking again and again for a fresh token.
        await cache.get(credentials, scope(0))
        hits_before = cache.stats.hits
        started = time.perf_counter()
        for _ in range(HIT_GETS):
            await cache.get(credentials, scope(0))
        hit_seconds = time.perf_counter() - started
        assert cache.stats.hits - hits_before == HIT_GETS
        started = time.perf_counter()
        for _ in range(HIT_GETS):
            await cache.get(credentials, scope(1), refresh_before=timedelta(minutes=10))
        hit_seconds_refresh_before = time.perf_counter() - started
    finally:
        cache.close()
        await client.aclose()

    print(f"token endpoint latency          : {LATENCY * 1000:.0f} ms (loopback HTTP server)")
    print(f"cache hit                       : {hit_seconds / HIT_GETS * 1e6:.2f} µs per get")
    print(f"                                  ({HIT_GETS:,} gets in {hit_seconds:.3f} s)")
    per_get = hit_seconds_refresh_before / HIT_GETS * 1e6
    print(f"cache hit with refreshBefore    : {per_get:.2f} µs per get")
    print(f"concurrent callers              : {CALLERS:,} for {KEYS} keys")
    print(f"endpoint requests               : {requests}  (expected {KEYS})")
    print(f"distinct tokens handed out      : {len(tokens)}")
    print(f"callers served a fresh token    : {served:,} of {CALLERS:,}")
    print(f"stampede wall time              : {stampede * 1000:.1f} ms")
    print(f"cache stats                     : {cache.stats}")
    return requests


def main() -> int:
    # A proxy from the environment must not intercept the loopback endpoint.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        requests = asyncio.run(measure(f"http://127.0.0.1:{server.server_port}/token"))
    finally:
        server.shutdown()
        server.server_close()
    if requests != KEYS:
        print(f"FAIL: {requests} endpoint requests for {KEYS} keys", file=sys.stderr)
        return 1
    print("OK: one endpoint request per key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
