"""The operator's CPU per token request: the path from `TokenCache.get` to the token.

A burst of new TokenRequests over many scopes is mostly token requests at its
start (each new scope is fetched once), and on a busy node the operator's
throughput is its CPU share over its CPU per TokenRequest. This measures that
path alone: N distinct scopes asked for at once through the real `TokenCache`
(its bound on requests in flight) and `TokenClient`, against a token endpoint in another
process on loopback, so that only the operator's side is counted
(`time.process_time()`: every thread of this process).

    .venv/bin/python bench/fetch_cost_bench.py [--scopes 2000] [--repeats 5]

Prints CPU ms per token request for each repeat and their median.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

from m2m_token_operator.tokens.cache import TokenCache
from m2m_token_operator.tokens.client import TokenClient
from m2m_token_operator.tokens.credentials import secret_credentials
from m2m_token_operator.tokens.timing import RefreshPolicy, RetryPolicy

IN_FLIGHT = 32  # M2M_FETCH_WORKERS' default: requests in flight at once

# A token endpoint on loopback in its own process: 20 ms per answer, a JWT-shaped token.
ENDPOINT = r"""
import base64, json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def b64(data):
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

count = 0
lock = threading.Lock()

class Endpoint(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global count
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(0.02)
        with lock:
            count += 1
            number = count
        now = int(time.time())
        claims = {"aud": "api://bench", "azp": "bench-client", "tid": "t", "iat": now,
                  "exp": now + 3600, "roles": ["read"], "n": number}
        token = b64({"typ": "JWT", "alg": "RS256"}) + "." + b64(claims) + ".c2ln"
        body = json.dumps({"token_type": "Bearer", "expires_in": 3599,
                           "access_token": token}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
server.daemon_threads = True
print(server.server_port, flush=True)
server.serve_forever()
"""


def utc_now() -> datetime:
    return datetime.now(UTC)


async def one_burst(endpoint: str, scopes: int, run: int) -> float:
    """CPU ms of this process per token request, for `scopes` fetched at once."""
    client = TokenClient(connect_timeout=2, read_timeout=10, pool_size=IN_FLIGHT, deadline=30.0)
    cache = TokenCache(
        fetch=client.fetch,
        refresh_policy=RefreshPolicy(),
        retry_policy=RetryPolicy(),
        clock=utc_now,
        max_requests=IN_FLIGHT,
    )
    credentials = secret_credentials(
        token_endpoint=endpoint,
        client_id="bench-client",
        client_secret="bench-secret-value",
        source="operator identity",
    )
    try:
        started = time.process_time()
        results = await asyncio.gather(
            *(
                cache.get(credentials, f"api://bench.run{run}.app-{i}/.default")
                for i in range(scopes)
            )
        )
        cpu = time.process_time() - started
    finally:
        cache.close()
        await client.aclose()
    missing = sum(result.token is None for result in results)
    if missing:
        raise SystemExit(f"{missing} of {scopes} token requests failed")
    return 1000 * cpu / scopes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scopes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    server = subprocess.Popen([sys.executable, "-c", ENDPOINT], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        endpoint = f"http://127.0.0.1:{server.stdout.readline().strip()}/token"
        figures = [
            asyncio.run(one_burst(endpoint, args.scopes, run)) for run in range(args.repeats)
        ]
    finally:
        server.terminate()
        server.wait()
    shown = ", ".join(f"{figure:.3f}" for figure in figures)
    print(f"CPU per token request, {args.scopes} scopes at once, {IN_FLIGHT} in flight: {shown} ms")
    print(f"median: {statistics.median(figures):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
