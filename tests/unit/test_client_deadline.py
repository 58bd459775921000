"""A drip-feeding token endpoint cannot hold a token request past its deadline.

The endpoint is a real socket server on loopback that sends its answer one byte
at a time, each byte well within the read timeout, so only a total deadline can
end the request. The HTTP client is not patched.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from m2m_token_operator.tokens.client import TokenClient
from m2m_token_operator.tokens.credentials import ClientCredentials, secret_credentials
from m2m_token_operator.tokens.model import AccessToken, EndpointUnavailable

SECRET = "drip-client-secret-Q~x"
BODY = b'{"access_token": "eyJ0eXAiOiJKV1QifQ.e30.c2ln", "expires_in": 3600}'


def _read_request(conn: socket.socket) -> None:
    """The whole request (head and form body), so that closing never resets the client."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


class DripServer:
    """Accepts connections and answers `payload` one byte per `interval` seconds."""

    def __init__(self, payload: bytes, interval: float, *, head_at_once: bool = False) -> None:
        self.payload = payload
        self.interval = interval
        self.head_at_once = head_at_once
        self.closed_early = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            _read_request(conn)
            payload = self.payload
            if self.head_at_once:
                split = payload.index(b"\r\n\r\n") + 4
                conn.sendall(payload[:split])
                payload = payload[split:]
            for byte in payload:
                if self._stop.wait(self.interval):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    self.closed_early.set()  # the client cut the connection
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # accept() wakes every 0.1 s to see the flag
        self._listener.close()


ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


@pytest.fixture(params=["headers", "body"])
def drip(request: pytest.FixtureRequest) -> Iterator[DripServer]:
    """Dripping from the first header byte on, or a prompt head and a dripping body."""
    server = DripServer(ANSWER, 0.05, head_at_once=request.param == "body")
    try:
        yield server
    finally:
        server.close()


def _credentials(port: int) -> ClientCredentials:
    return secret_credentials(
        client_id="drip-client",
        client_secret=SECRET,
        token_endpoint=f"http://127.0.0.1:{port}/token",
        source="test",
    )


async def test_a_dripping_answer_ends_at_the_deadline(drip: DripServer) -> None:
    # Each byte comes within 0.05 s, far inside the 5 s read timeout; the whole answer
    # would take about len(answer) * 0.05 s (several seconds). The deadline is 0.5 s.
    client = TokenClient(connect_timeout=5, read_timeout=5, deadline=0.5)
    started = time.monotonic()
    with pytest.raises(EndpointUnavailable) as caught:
        await client.fetch(_credentials(drip.port), "api://x/.default")
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"held for {elapsed:.2f}s past a 0.5s deadline"
    assert len(BODY) * drip.interval > 2.5  # the drip alone would take longer than that
    message = str(caught.value)
    assert "0.5s deadline" in message
    assert "M2M_REQUEST_DEADLINE_SECONDS" in message
    assert SECRET not in message
    assert caught.value.reason == "EndpointUnavailable"
    # The connection is cut, not left to drip on: the server sees it closed.
    # Waited for on a thread: the loop must run to close the socket.
    assert await asyncio.to_thread(drip.closed_early.wait, 10)
    await client.aclose()


async def test_a_prompt_answer_is_untouched_by_the_deadline() -> None:
    server = DripServer(ANSWER, 0.0)
    try:
        client = TokenClient(connect_timeout=5, read_timeout=5, deadline=2.0)
        token = await client.fetch(_credentials(server.port), "api://x/.default")
        assert token.value.startswith("eyJ")
        assert not server.closed_early.is_set()
        await client.aclose()
    finally:
        server.close()


async def test_each_deadline_cuts_only_its_own_answer() -> None:
    """Two requests to the same dripping endpoint at once: the one with the short
    deadline fails at it, the one with the long deadline gets its token."""
    slow = DripServer(ANSWER, 0.01)  # the whole answer takes about 1.5 s
    try:
        short = TokenClient(connect_timeout=5, read_timeout=5, deadline=0.6)
        late = TokenClient(connect_timeout=5, read_timeout=5, deadline=30.0)
        started = time.monotonic()
        cut, token = await asyncio.gather(
            short.fetch(_credentials(slow.port), "api://x/.default"),
            late.fetch(_credentials(slow.port), "api://y/.default"),
            return_exceptions=True,
        )
        assert isinstance(cut, EndpointUnavailable), cut
        assert "0.6s deadline" in str(cut)
        assert isinstance(token, AccessToken), token
        assert time.monotonic() - started >= len(BODY) * slow.interval * 0.8  # it dripped
        await short.aclose()
        await late.aclose()
    finally:
        slow.close()
