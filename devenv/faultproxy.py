"""A fault-injecting HTTP proxy between the operator and a real kube-apiserver, on loopback.

Tests need the real API server's semantics (validation, patches, garbage
collection, watches, RBAC) *and* the odd failure: a 409 on one Secret replace,
a slow API server, a watch stream that breaks, a watch answered with
``410 Gone``. This proxy gives both. It listens on plain http on 127.0.0.1 and
forwards every request over https to the API server (verifying it with the
cluster CA), passing the client's ``Authorization`` header through: a
kubeconfig with ``server: http://127.0.0.1:<port>`` and the ServiceAccount's
bearer token makes the operator talk to the real API server as itself.

A test adds rules at run time (``proxy.add(Rule(...))``) and removes them
(``proxy.remove(rule)``, ``proxy.clear()``); the first rule that takes a
request decides what happens to it:

* :class:`Fail`: answer with this status and a Kubernetes ``Status`` body
  (nothing reaches the API server, so nothing changes);
* :class:`Delay`: wait, then forward (a slow API server; :meth:`FaultProxy.clear`
  ends the waits);
* :class:`DropWatch`: forward a watch, then close the connection after that
  many events (a broken stream);
* :class:`Gone`: answer a watch with one ``ERROR`` event of code 410, as the
  API server does when the requested resourceVersion is too old.

A rule matches on the method, a regular expression searched in the path, and
optionally whether the request is a watch; ``skip`` lets the first matching
requests through, ``times`` says how many after those it takes (None: all).
Every request the proxy answers is recorded (:attr:`FaultProxy.exchanges`,
:meth:`FaultProxy.wait_for`) with its method, path, query and status, so a
test can wait for "the operator sent PUT .../secrets/x". Open watches can be
broken on demand (:meth:`FaultProxy.drop_watches`).

The proxy runs aiohttp (a dependency of Kopf) on its own event loop in a
daemon thread; its public methods are thread-safe and may be called from
tests, sync or async.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

_T = TypeVar("_T")

__all__ = [
    "Action",
    "Delay",
    "DropWatch",
    "Exchange",
    "Fail",
    "FaultProxy",
    "Gone",
    "Rule",
    "RuleBook",
    "is_watch",
    "status_body",
]

# Hop-by-hop headers and those the proxy recomputes (it re-frames and decompresses bodies).
_REQUEST_HEADERS_DROPPED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "keep-alive"}
)
_RESPONSE_HEADERS_DROPPED = frozenset(
    {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}
)

# The reason the API server gives with each status code in a Status body.
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_body(code: int, message: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """A ``meta/v1 Status`` failure as the API server sends it."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message or f"injected by the test proxy: HTTP {code}",
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }


def is_watch(path: str, query: str) -> bool:
    """Whether a request is a watch: ``?watch=true`` (or 1), or the legacy ``/watch/`` paths."""
    values = urllib.parse.parse_qs(query).get("watch", [])
    return any(v.lower() in ("true", "1") for v in values) or "/watch/" in path


# ---- actions -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fail:
    """Answer with ``status`` and a Status body; the API server never sees the request."""

    status: int
    message: str | None = None
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Delay:
    """Hold the request ``seconds`` before forwarding it."""

    seconds: float


@dataclasses.dataclass(frozen=True)
class DropWatch:
    """Forward the watch, then close the connection after ``after_events`` events (0: at once,
    right after the response headers)."""

    after_events: int = 0


@dataclasses.dataclass(frozen=True)
class Gone:
    """Answer a watch with HTTP 200 and one ERROR event of code 410 (resourceVersion too old)."""

    message: str = "too old resource version: injected by the test proxy"


Action = Fail | Delay | DropWatch | Gone


@dataclasses.dataclass(eq=False)
class Rule:
    """Which requests get an action: see the module docstring.

    ``method`` None matches any method; ``path`` is searched (``re.search``) in
    the URL path without the query, ``query`` in the query string; ``watch``
    None matches watches and other requests alike. ``seen`` and ``applied`` count as the proxy goes.
    """

    action: Action
    method: str | None = None
    path: str = ""
    watch: bool | None = None
    skip: int = 0
    times: int | None = 1
    seen: int = 0
    applied: int = 0
    query: str = ""

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.path)
        self._query_pattern = re.compile(self.query)
        if self.method is not None:
            self.method = self.method.upper()

    def matches(self, method: str, path: str, query: str) -> bool:
        """Whether the request is one this rule is about (regardless of skip/times)."""
        if self.method is not None and method.upper() != self.method:
            return False
        if self.watch is not None and is_watch(path, query) != self.watch:
            return False
        if self._query_pattern.search(query) is None:
            return False
        return self._pattern.search(path) is not None

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.applied >= self.times


class RuleBook:
    """The rules in order; :meth:`select` decides for one request and counts it. Thread-safe."""

    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self._lock = threading.Lock()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def select(self, method: str, path: str, query: str = "") -> Action | None:
        """The action for this request, or None to forward it untouched.

        Every rule that matches and is not exhausted counts the request as seen;
        the first of them past its ``skip`` takes it. A rule skipping a request
        does not hide it from the rules after it.
        """
        with self._lock:
            chosen: Action | None = None
            for rule in self._rules:
                if rule.exhausted or not rule.matches(method, path, query):
                    continue
                rule.seen += 1
                if chosen is None and rule.seen > rule.skip:
                    rule.applied += 1
                    chosen = rule.action
            return chosen


# ---- the record ----------------------------------------------------------------------------


_RECEIVED_AT = web.RequestKey("m2m_received_at", float)  # the arrival time, on the request


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One request the proxy answered (or began answering, for a stream)."""

    index: int  # 1-based, in the order the answers started
    method: str
    path: str
    query: str
    status: int  # the status sent to the client
    injected: bool  # answered by a rule (Fail, Gone), not by the API server
    watch: bool
    at: float  # time.monotonic() when the answer started
    # time.monotonic() when the request arrived: what a client sent before a moment
    # may be answered after it (a slow upstream, a Delay rule).
    received_at: float = 0.0

    def __str__(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"{self.method} {self.path}{query} -> {self.status}"


# ---- the proxy -----------------------------------------------------------------------------


class FaultProxy:
    """The proxy server: ``with FaultProxy(upstream, ca_file) as proxy: proxy.url ...``."""

    def __init__(
        self, upstream: str, *, ca_file: Path | str | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules = RuleBook()
        self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._host = host
        self._port = 0
        self._exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._released = asyncio.Event()  # set (and replaced) to end every Delay at once
        # The open watch streams by id: the client's request, its path, the API server's answer.
        self._watches: dict[int, tuple[web.Request, str, aiohttp.ClientResponse]] = {}

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        self._started.wait(15)
        if self._startup_error is not None:
            raise RuntimeError("the fault proxy did not start") from self._startup_error
        if not self._port:
            raise RuntimeError("the fault proxy did not start within 15 s")
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    # ---- rules -----------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        """Add a rule (after the existing ones); return it, to remove it later."""
        return self.rules.add(rule)

    def remove(self, rule: Rule) -> None:
        self.rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule, and let the requests that a :class:`Delay` holds go on now."""
        self.rules.clear()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._release_held)

    def _release_held(self) -> None:
        self._released.set()
        self._released = asyncio.Event()

    def drop_watches(self, path: str = "") -> int:
        """Close every open watch stream whose path matches ``path`` (re.search); how many."""
        loop = self._loop
        if loop is None:
            return 0
        pattern = re.compile(path)

        def drop() -> int:
            doomed = [(r, u) for r, p, u in self._watches.values() if pattern.search(p)]
            for request, upstream in doomed:
                _abort(request)
                upstream.close()
            return len(doomed)

        return asyncio.run_coroutine_threadsafe(_call(drop), loop).result(10)

    def open_watches(self, path: str = "") -> list[str]:
        """The paths of the watch streams open now that match ``path``."""
        loop = self._loop
        if loop is None:
            return []
        pattern = re.compile(path)

        def collect() -> list[str]:
            return [p for _, p, _ in self._watches.values() if pattern.search(p)]

        return asyncio.run_coroutine_threadsafe(_call(collect), loop).result(10)

    # ---- the record ------------------------------------------------------------------

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    def requests(
        self,
        method: str | None = None,
        path: str = "",
        *,
        watch: bool | None = None,
        since: float = 0.0,
    ) -> list[Exchange]:
        """The recorded exchanges of this method whose path matches ``path`` (re.search)."""
        pattern = re.compile(path)
        return [
            e
            for e in self.exchanges
            if (method is None or e.method == method.upper())
            and pattern.search(e.path)
            and (watch is None or e.watch == watch)
            and e.at >= since
        ]

    async def wait_for(
        self,
        method: str | None = None,
        path: str = "",
        *,
        count: int = 1,
        watch: bool | None = None,
        since: float = 0.0,
        status: int | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline
    ) -> list[Exchange]:
        """Wait until ``count`` such exchanges were recorded (with this status, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                e
                for e in self.requests(method, path, watch=watch, since=since)
                if status is None or e.status == status
            ]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the proxy saw {len(found)} of {count} {method or 'any'} {path!r}"
                    f" (status {status}) in {timeout}s; the last requests:\n"
                    + "\n".join(str(e) for e in self.exchanges[-20:])
                )
            await asyncio.sleep(0.02)

    def _record(
        self, request: web.Request, status: int, *, injected: bool, watch: bool
    ) -> Exchange:
        with self._lock:
            exchange = Exchange(
                index=len(self._exchanges) + 1,
                method=request.method,
                path=request.path,
                query=request.query_string,
                status=status,
                injected=injected,
                watch=watch,
                at=time.monotonic(),
                received_at=request.get(_RECEIVED_AT, 0.0),
            )
            self._exchanges.append(exchange)
        return exchange

    # ---- serving ---------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:  # reported by start() if it happened at startup
            self._startup_error = error
            self._started.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._released = asyncio.Event()
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=True
        ) as session:
            self._session = session
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, self._host, 0)
            await site.start()
            server = site._server  # aiohttp has no public accessor for the bound port
            assert server is not None
            sockets = getattr(server, "sockets", None) or []
            self._port = int(sockets[0].getsockname()[1])
            self._started.set()
            try:
                await self._stop.wait()
            finally:
                for request, _, upstream in list(self._watches.values()):
                    _abort(request)
                    upstream.close()
                await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        request[_RECEIVED_AT] = time.monotonic()
        watch = is_watch(request.path, request.query_string)
        action = self.rules.select(request.method, request.path, request.query_string)
        if isinstance(action, Delay):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), action.seconds)
        if isinstance(action, Fail):
            self._record(request, action.status, injected=True, watch=watch)
            return web.json_response(
                status_body(action.status, action.message, action.reason), status=action.status
            )
        if isinstance(action, Gone):
            return await self._gone(request, action, watch=watch)
        drop_after = action.after_events if isinstance(action, DropWatch) else None
        return await self._forward(request, watch=watch, drop_after=drop_after)

    async def _gone(self, request: web.Request, action: Gone, *, watch: bool) -> web.StreamResponse:
        self._record(request, 200, injected=True, watch=watch)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        event = {"type": "ERROR", "object": status_body(410, action.message, "Expired")}
        await response.write(json.dumps(event).encode() + b"\n")
        await response.write_eof()
        return response

    async def _forward(
        self, request: web.Request, *, watch: bool, drop_after: int | None
    ) -> web.StreamResponse:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_HEADERS_DROPPED
        }
        body = await request.read()
        url = f"{self.upstream}{request.path_qs}"
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                # The kubernetes client sends JSON bodies without a Content-Type (the API
                # server assumes JSON); aiohttp's default, octet-stream, would get a 415.
                skip_auto_headers=("Content-Type",),
            )
        except (aiohttp.ClientError, OSError) as error:
            self._record(request, 502, injected=False, watch=watch)
            return web.json_response(
                status_body(502, f"the proxy could not reach the API server: {error}"), status=502
            )
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={
                    k: v
                    for k, v in upstream.headers.items()
                    if k.lower() not in _RESPONSE_HEADERS_DROPPED
                },
            )
            self._record(request, upstream.status, injected=False, watch=watch)
            await response.prepare(request)
            if not watch:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            self._watches[id(request)] = (request, request.path, upstream)
            try:
                events = 0
                if drop_after == 0:
                    _abort(request)
                    return response
                async for line in upstream.content:  # one JSON event per line
                    await response.write(line)
                    events += 1
                    if drop_after is not None and events >= drop_after:
                        _abort(request)
                        return response
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientError):
                pass  # the client went away or the stream was dropped
            finally:
                self._watches.pop(id(request), None)
            return response


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def _call(function: Callable[[], _T]) -> _T:
    return function()


def describe(exchanges: Iterable[Exchange]) -> str:
    """The exchanges one per line, for assertion messages."""
    return "\n".join(str(e) for e in exchanges)
