"""One keep-alive HTTP client to the Kubernetes API server, on the event loop.

The operator's point reads and writes used to go through the blocking `kubernetes`
client on a thread pool: under a burst, its urllib3 and model plumbing and the hops
between the loop and the threads were a quarter of the operator's CPU. This client
sends the same requests with aiohttp on Kopf's event loop, built from the same
`kubernetes.client.Configuration` (host, TLS, bearer token, proxy), and returns the
answer's status and whole body: what an answer means is the caller's business.

Retries: at most one, and never with a backoff. A request that could not connect
(refused, unreachable) is sent once more: it cannot have reached the server. An
idempotent request (GET, PUT, DELETE) whose pooled keep-alive connection the server
had dropped is sent again by aiohttp itself (RFC 9112 §9.3.1.1); a POST or PATCH
whose answer was lost is not: the caller's next look decides.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

JSON = "application/json"
USER_AGENT = "m2m-token-operator"
# How long the authentication headers are reused before the configuration is asked
# again. Asking runs the kubeconfig loader's refresh hook, which re-applies the whole
# configuration: a tenth of a look's CPU when done per request. A rotated
# ServiceAccount token stays valid long after its successor is written (the in-cluster
# loader itself re-reads the file at most once a minute), so seconds are safe.
AUTH_SECONDS = 5.0


class TransportClosed(ConnectionError):
    """A request after `close()`: the operator is stopping."""


# What a request can raise besides an answer: the caller maps them all to one error.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
)


@dataclass(frozen=True)
class Answer:
    """The API server's answer, read to its end (the connection goes back to the pool)."""

    status: int
    reason: str
    body: bytes


def ssl_context(configuration: Any) -> ssl.SSLContext:
    """The TLS settings of a kubernetes client Configuration, as one SSLContext."""
    if configuration.verify_ssl:
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
        if configuration.assert_hostname is False:
            context.check_hostname = False
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    return context


class HttpTransport:
    """Requests to one API server over at most `connections` keep-alive connections.

    The session is created on the first request, on the loop that makes it (a
    session belongs to one loop); `aclose` (or `close`, from synchronous code on
    that loop) releases it.
    """

    def __init__(
        self,
        configuration: Any,
        *,
        connections: int,
        timeout: tuple[float, float],
        auth_seconds: float = AUTH_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configuration = configuration  # read again: its token may be refreshed
        self._auth_seconds = auth_seconds
        self._monotonic = monotonic
        self._auth_headers: dict[str, str] = {}
        self._auth_read_at: float | None = None
        self._base_url = str(configuration.host).rstrip("/")
        # Built now, so that a missing CA or client certificate fails at start, not later.
        self._ssl: ssl.SSLContext | bool = (
            ssl_context(configuration) if self._base_url.startswith("https:") else True
        )
        self._server_hostname: str | None = getattr(configuration, "tls_server_name", None)
        self._proxy: str | None = getattr(configuration, "proxy", None) or None
        proxy_headers = getattr(configuration, "proxy_headers", None)
        self._proxy_headers = dict(proxy_headers) if proxy_headers else None
        # Only the options that are set: each one given costs aiohttp work per request.
        self._options: dict[str, Any] = {
            name: value
            for name, value in (
                ("proxy", self._proxy),
                ("proxy_headers", self._proxy_headers),
                ("server_hostname", self._server_hostname),
            )
            if value is not None
        }
        self._headers_for: dict[str, str] | None = None
        self._headers_by_type: dict[str | None, dict[str, str]] = {}
        self._connections = connections
        # (connect, read) as urllib3 had them: no overall limit, a limit per socket wait.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeout[0], sock_read=timeout[1]
        )
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = JSON,
    ) -> Answer:
        """Send one request; its answer whatever the status, or a `TRANSPORT_ERRORS` one."""
        session = self._session_now()
        headers = self._headers(None if body is None else content_type)
        url = self._base_url + path
        if query:
            url += "?" + urlencode(query, quote_via=quote)
        for attempt in (1, 2):
            try:
                async with session.request(
                    method, url, data=body, headers=headers, allow_redirects=False, **self._options
                ) as response:
                    answer = Answer(response.status, response.reason or "", await response.read())
                if answer.status == 401:
                    self.forget_authentication()  # the next request asks for a fresh token
                return answer
            except aiohttp.ClientSSLError:
                raise  # a certificate refused now is refused again
            except aiohttp.ClientConnectorError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _headers(self, content_type: str | None) -> dict[str, str]:
        """The request's headers: built once per content type and authentication."""
        authentication = self._authentication()
        if authentication is not self._headers_for:
            self._headers_for = authentication
            self._headers_by_type.clear()
        headers = self._headers_by_type.get(content_type)
        if headers is None:
            headers = {"Accept": JSON, **authentication}
            if content_type is not None:
                headers["Content-Type"] = content_type
            self._headers_by_type[content_type] = headers
        return headers  # aiohttp copies it into the request's own CIMultiDict

    def _authentication(self) -> dict[str, str]:
        """The headers that authenticate a request, asked of the configuration at most
        every `auth_seconds`: as the kubernetes client authenticates, the bearer token
        (under `BearerToken`, or its alias `authorization`) through the refresh hook that
        the in-cluster config installs for rotated ServiceAccount tokens."""
        now = self._monotonic()
        if self._auth_read_at is None or now - self._auth_read_at >= self._auth_seconds:
            headers: dict[str, str] = {}
            for setting in self._configuration.auth_settings().values():
                if setting.get("in") == "header" and setting.get("value"):
                    headers[setting["key"]] = setting["value"]
            self._auth_headers = headers
            self._auth_read_at = now
        return self._auth_headers

    def forget_authentication(self) -> None:
        """The API server refused our credentials (401): ask the configuration again."""
        self._auth_read_at = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._closed:
            raise TransportClosed("the Kubernetes API client is closed")
        if self._session is None:
            self._loop = asyncio.get_running_loop()
            connector = aiohttp.TCPConnector(
                ssl=self._ssl, limit=self._connections, limit_per_host=self._connections
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                # Uncompressed answers, as the kubernetes client gets them: compressing a
                # large list costs the API server and us more CPU than loopback or a
                # cluster network saves. Said as a header, not by skip_auto_headers,
                # which costs aiohttp a header copy per request.
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                trust_env=False,  # the kubernetes client reads no proxy from the environment
            )
        return self._session

    async def aclose(self) -> None:
        """Close the connections and refuse any further request."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def close(self) -> None:
        """`aclose` from synchronous code: the session closes on its loop, soon after."""
        self._closed = True
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        owner = self._loop
        if owner is None or owner.is_closed():
            session.detach()  # its loop has ended, and its connections with it
        elif owner is running:
            task = owner.create_task(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        elif owner.is_running():
            asyncio.run_coroutine_threadsafe(session.close(), owner)  # from another thread
        else:
            owner.run_until_complete(session.close())
