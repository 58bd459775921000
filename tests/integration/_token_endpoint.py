"""A real OAuth 2.0 token endpoint (client credentials) on loopback, programmable per request.

It is an ``http.server.ThreadingHTTPServer`` in a thread, so the operator's
``requests`` client talks real HTTP to it. Every POST is recorded (form
fields, headers, the answer) under a lock. By default each call gets a fresh,
unique access token (``tok-<n>-<random>``); a test programs anything else:

    token_endpoint.expires_in = 120                     # the default success
    token_endpoint.program(Reply.oauth_error(401, "invalid_client"), Reply.ok())
    token_endpoint.always(Reply.oauth_error(429, "throttled", retry_after=3))
    token_endpoint.responder = lambda call: Reply.ok() if call.form["scope"] == "a" else ...
    token_endpoint.pause(); ...; token_endpoint.resume()  # hold every call until resumed

The order of precedence for a call: the queue of ``program()``-ed one-shot
replies; then the protocol checks (``grant_type=client_credentials``, and the
credentials once ``register_client()`` was called); then ``responder``; then
``default`` (``always()`` sets it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class Reply:
    """What the endpoint answers to one call.

    ``body=None`` with status 200 is a success with a fresh unique token;
    ``body`` as a mapping is sent as JSON, as bytes verbatim (with
    ``content_type``). ``delay`` holds the answer that many seconds;
    ``drop`` closes the connection without any answer.
    """

    status: int = 200
    body: Mapping[str, Any] | bytes | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    content_type: str = "application/json; charset=utf-8"
    delay: float = 0.0
    drop: bool = False
    expires_in: int | str | None = None  # overrides the endpoint's default in a success
    token_type: str = "Bearer"

    @classmethod
    def ok(cls, *, expires_in: int | str | None = None, delay: float = 0.0) -> Reply:
        return cls(expires_in=expires_in, delay=delay)

    @classmethod
    def oauth_error(
        cls,
        status: int,
        error: str,
        description: str | None = None,
        *,
        error_codes: tuple[int, ...] = (),
        retry_after: float | str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> Reply:
        """An error in Entra ID's shape: error, error_description, error_codes, trace ids."""
        body: dict[str, Any] = {
            "error": error,
            "error_description": description or f"AADSTS: {error} (test endpoint)",
            "error_codes": list(error_codes),
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": secrets.token_hex(8),
            "correlation_id": secrets.token_hex(8),
        }
        all_headers = dict(headers or {})
        if retry_after is not None:
            all_headers["Retry-After"] = str(retry_after)
        return cls(status=status, body=body, headers=all_headers, delay=delay)

    @classmethod
    def raw(
        cls,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "text/html",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """A non-JSON answer, e.g. a proxy's HTML 502 page."""
        return cls(status=status, body=body, content_type=content_type, headers=dict(headers or {}))

    @classmethod
    def json(cls, status: int, body: Mapping[str, Any], **kwargs: Any) -> Reply:
        """Any JSON body verbatim, e.g. a 200 without ``access_token``."""
        return cls(status=status, body=body, **kwargs)

    @classmethod
    def dropped(cls, *, delay: float = 0.0) -> Reply:
        """The connection closes without an answer."""
        return cls(drop=True, delay=delay)


@dataclasses.dataclass(frozen=True)
class TokenCall:
    """One request the endpoint received, and what it answered."""

    index: int  # 1-based, in arrival order
    path: str
    form: Mapping[str, str]
    headers: Mapping[str, str]
    received_at: float  # time.monotonic()
    status: int
    access_token: str | None  # the token handed out, if it was a success


Responder = Callable[[TokenCall], Reply]


class TokenEndpoint:
    """The server and its programming; see the module docstring."""

    path: ClassVar[str] = "/test-tenant/oauth2/v2.0/token"

    def __init__(self) -> None:
        self.expires_in: int | str = 3599
        self.default: Reply = Reply()
        self.responder: Responder | None = None
        self._queue: list[Reply] = []
        self._clients: dict[str, str] = {}
        self._calls: list[TokenCall] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._released = threading.Event()
        self._released.set()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="token-endpoint",
            daemon=True,
        )

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._closing.set()
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The token endpoint URL to configure (AZURE_OPENID_CONFIG_TOKEN_ENDPOINT)."""
        return f"http://127.0.0.1:{self.port}{self.path}"

    # ---- programming ---------------------------------------------------------------------

    def program(self, *replies: Reply) -> None:
        """Queue one-shot replies for the next calls, in order (after those already queued)."""
        with self._lock:
            self._queue.extend(replies)

    def always(self, reply: Reply) -> None:
        """Answer every call that no queued reply or responder takes with ``reply``."""
        with self._lock:
            self.default = reply

    def reset(self) -> None:
        """Forget the programming and the recorded calls; succeed with fresh tokens again."""
        with self._lock:
            self._queue.clear()
            self._calls.clear()
            self.default = Reply()
            self.responder = None
            self._clients.clear()
        self.resume()

    def pause(self) -> None:
        """Hold every call (after recording it) until :meth:`resume`."""
        self._released.clear()

    def resume(self) -> None:
        self._released.set()

    # ---- observation ---------------------------------------------------------------------

    @property
    def calls(self) -> list[TokenCall]:
        """Every answered call so far (a copy), in arrival order."""
        with self._lock:
            return list(self._calls)

    @property
    def count(self) -> int:
        """How many calls arrived (answered or still held)."""
        with self._lock:
            return self._counter

    @property
    def tokens(self) -> list[str]:
        """Every access token handed out, in order."""
        return [call.access_token for call in self.calls if call.access_token is not None]

    async def wait_for_calls(self, count: int, timeout: float = 5.0) -> list[TokenCall]:  # noqa: ASYNC109
        """Wait until at least ``count`` calls have been answered; return them all."""
        deadline = time.monotonic() + timeout
        while len(calls := self.calls) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the token endpoint got {len(calls)} call(s) in {timeout}s, expected {count}"
                )
            await asyncio.sleep(0.01)
        return calls

    # ---- serving -------------------------------------------------------------------------

    def register_client(self, client_id: str, client_secret: str) -> None:
        """Check credentials from now on: unknown clients and wrong secrets fail as in Entra ID."""
        with self._lock:
            self._clients[client_id] = client_secret

    def _next_reply(self, call: TokenCall) -> Reply:
        with self._lock:
            if self._queue:
                return self._queue.pop(0)
            responder, default, clients = self.responder, self.default, dict(self._clients)
        if call.form.get("grant_type") != "client_credentials":
            return Reply.oauth_error(400, "unsupported_grant_type", error_codes=(70003,))
        client_id = call.form.get("client_id", "")
        if clients and client_id not in clients:
            return Reply.oauth_error(400, "unauthorized_client", error_codes=(700016,))
        if clients and clients[client_id] != call.form.get("client_secret"):
            return Reply.oauth_error(401, "invalid_client", error_codes=(7000215,))
        return responder(call) if responder is not None else default

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        form = dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        with self._lock:
            self._counter += 1
            index = self._counter
        received_at = time.monotonic()
        pending = TokenCall(
            index=index,
            path=handler.path,
            form=form,
            headers=dict(handler.headers.items()),
            received_at=received_at,
            status=0,
            access_token=None,
        )
        reply = self._next_reply(pending)
        self._released.wait()
        if reply.delay:
            self._closing.wait(reply.delay)

        token: str | None = None
        body = reply.body
        if reply.status == 200 and body is None:
            token = f"tok-{index}-{secrets.token_hex(6)}"
            expires_in = reply.expires_in if reply.expires_in is not None else self.expires_in
            body = {"access_token": token, "token_type": reply.token_type, "expires_in": expires_in}
        with self._lock:
            status = 0 if reply.drop else reply.status
            self._calls.append(dataclasses.replace(pending, status=status, access_token=token))
        if reply.drop:
            handler.close_connection = True
            return
        payload = json.dumps(body).encode() if isinstance(body, Mapping) else (body or b"")
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.content_type)
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Cache-Control", "no-store")
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                if urllib.parse.urlsplit(self.path).path != endpoint.path:
                    self._plain(404, b'{"error":"not_found"}')
                    return
                endpoint._serve(self)

            def do_GET(self) -> None:
                self._plain(405, b'{"error":"invalid_request","error_description":"use POST"}')

            def _plain(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass  # stderr belongs to the operator's captured output while it runs

        return Handler
