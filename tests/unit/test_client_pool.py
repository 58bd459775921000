"""Token requests in flight at once keep their connections to the endpoint alive.

A connection dropped after each request costs the next one a new connection
(with Entra ID, a TLS handshake). The endpoint is a real HTTP/1.1 server on
loopback that counts the connections it accepted; the HTTP client is not patched.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from m2m_token_operator.tokens.client import TokenClient
from m2m_token_operator.tokens.credentials import secret_credentials

WORKERS = 16
ROUNDS = 3
TOKEN = "eyJ0eXAiOiJKV1QifQ.eyJhdWQiOiJhcGk6Ly94In0.c2lnbmF0dXJlLXZhbHVl"


class CountingEndpoint(ThreadingHTTPServer):
    """Answers every POST with a token, keeps connections alive, counts them.

    Each answer waits until WORKERS requests are in flight, so every round needs
    WORKERS connections at once, however fast the machine.
    """

    daemon_threads = True

    def __init__(self) -> None:
        self.connections = 0
        self.lock = threading.Lock()
        self.in_flight = threading.Barrier(WORKERS, timeout=30)
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: object, client_address: object) -> None:
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Entra ID answers

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        assert isinstance(self.server, CountingEndpoint)
        self.server.in_flight.wait()
        body = json.dumps({"access_token": TOKEN, "expires_in": 3600}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingEndpoint]:
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    server = CountingEndpoint()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def _fetch_in_rounds(client: TokenClient, port: int) -> None:
    """WORKERS requests at once, ROUNDS times; each round starts once all are back."""
    credentials = secret_credentials(
        token_endpoint=f"http://127.0.0.1:{port}/tenant/oauth2/v2.0/token",
        client_id="client-1",
        client_secret="pool-client-secret-Q~x",
        source="Secret shop/azure-shop",
    )
    for round_ in range(ROUNDS):
        await asyncio.gather(
            *(
                client.fetch(credentials, f"api://c.ns.app-{index}-{round_}/.default")
                for index in range(WORKERS)
            )
        )


async def test_each_request_in_flight_keeps_its_connection(endpoint: CountingEndpoint) -> None:
    client = TokenClient(connect_timeout=5, read_timeout=5, pool_size=WORKERS)
    try:
        await _fetch_in_rounds(client, endpoint.server_address[1])
    finally:
        await client.aclose()
    # Each round needs WORKERS connections at once (the server answers none before);
    # the later rounds reuse them.
    assert endpoint.connections == WORKERS
