"""Every fetch worker keeps its connection to the token endpoint alive.

A pool smaller than the workers made each fetch beyond it open a connection
(with Entra ID, a TLS handshake) and drop it afterwards, with a urllib3
warning per fetch. The endpoint is a real HTTP/1.1 server on loopback that
counts the connections it accepted; `requests` is not patched.
"""

from __future__ import annotations

import json
import logging
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


def _fetch_in_rounds(client: TokenClient, port: int) -> None:
    """WORKERS threads fetch at once, ROUNDS times; each round starts once all are back."""
    credentials = secret_credentials(
        token_endpoint=f"http://127.0.0.1:{port}/tenant/oauth2/v2.0/token",
        client_id="client-1",
        client_secret="pool-client-secret-Q~x",
        source="Secret shop/azure-shop",
    )
    all_back = threading.Barrier(WORKERS, timeout=30)
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(ROUNDS):
                client.fetch(credentials, f"api://c.ns.app-{index}-{round_}/.default")
                all_back.wait()
        except BaseException as error:  # reported below, in the test's thread
            failures.append(error)
            all_back.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures


def test_each_worker_keeps_its_connection(
    endpoint: CountingEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    client = TokenClient(connect_timeout=5, read_timeout=5, pool_size=WORKERS)
    try:
        with caplog.at_level(logging.WARNING):
            _fetch_in_rounds(client, endpoint.server_address[1])
    finally:
        client.close()
    assert endpoint.connections <= WORKERS
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_a_smaller_pool_drops_connections(endpoint: CountingEndpoint) -> None:
    """The cost the pool size avoids, shown by the same server: new connections per round."""
    client = TokenClient(connect_timeout=5, read_timeout=5, pool_size=WORKERS // 2)
    try:
        _fetch_in_rounds(client, endpoint.server_address[1])
    finally:
        client.close()
    assert endpoint.connections > WORKERS
