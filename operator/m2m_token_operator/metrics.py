"""Prometheus metrics: what a platform team alerts on.

Per TokenRequest: the expiry of the token in its Secret and whether it is
ready. Per call to the token endpoint: the result class and the latency. Per
cache lookup: hit or miss. Label values are names and reason classes only,
never a scope's secret part (scopes hold none) and never a token.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from m2m_token_operator.credentials import ClientCredentials
from m2m_token_operator.tokens import AccessToken, TokenEndpointError

TOKEN_EXPIRY = Gauge(
    "m2m_token_expiry_timestamp_seconds",
    "Unix time at which the token in the TokenRequest's Secret expires (0 when none).",
    ["namespace", "name"],
)
TOKEN_READY = Gauge(
    "m2m_token_ready",
    "1 while the TokenRequest's Secret holds an unexpired token, else 0.",
    ["namespace", "name"],
)
REFRESH_FAILURES = Counter(
    "m2m_token_refresh_failures_total",
    "Attempts that left a TokenRequest without a fresh token, by failure reason.",
    ["namespace", "name", "reason"],
)
ENDPOINT_REQUESTS = Counter(
    "m2m_token_endpoint_requests_total",
    "Requests sent to token endpoints, by result (success or the failure reason).",
    ["result"],
)
ENDPOINT_LATENCY = Histogram(
    "m2m_token_endpoint_request_duration_seconds",
    "Time from sending a token request to its answer or failure.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CACHE_LOOKUPS = Counter(
    "m2m_token_cache_lookups_total",
    "Token cache lookups, by result: hit (served from cache) or miss (a request was sent).",
    ["result"],
)

LOOK_ERRORS = Counter(
    "m2m_look_errors_total",
    "Looks at a TokenRequest ended by an unexpected exception (a bug; see the operator log).",
)

Fetch = Callable[[ClientCredentials, str], AccessToken]


def record_look_error() -> None:
    LOOK_ERRORS.inc()


def instrument_fetch(fetch: Fetch) -> Fetch:
    """Wrap the blocking token fetch so every call is counted and timed."""

    def instrumented(credentials: ClientCredentials, scope: str) -> AccessToken:
        started = time.perf_counter()
        try:
            token = fetch(credentials, scope)
        except TokenEndpointError as error:
            ENDPOINT_REQUESTS.labels(result=error.reason).inc()
            raise
        finally:
            ENDPOINT_LATENCY.observe(time.perf_counter() - started)
        ENDPOINT_REQUESTS.labels(result="success").inc()
        return token

    return instrumented


def record_cache_lookup(*, fetched: bool) -> None:
    CACHE_LOOKUPS.labels(result="miss" if fetched else "hit").inc()


def observe_token_request(
    namespace: str,
    name: str,
    *,
    ready: bool,
    expires_at: datetime | None,
) -> None:
    TOKEN_READY.labels(namespace=namespace, name=name).set(1 if ready else 0)
    TOKEN_EXPIRY.labels(namespace=namespace, name=name).set(
        expires_at.timestamp() if expires_at else 0
    )


# The failure reasons recorded per TokenRequest, so that forgetting one removes exactly its
# counter series without scanning every series of every TokenRequest.
_failure_reasons: dict[tuple[str, str], set[str]] = {}


def record_refresh_failure(namespace: str, name: str, *, reason: str) -> None:
    REFRESH_FAILURES.labels(namespace=namespace, name=name, reason=reason).inc()
    _failure_reasons.setdefault((namespace, name), set()).add(reason)


def forget_token_request(namespace: str, name: str) -> None:
    """A deleted TokenRequest must not leave a gauge that alerts forever, nor counters that
    pile up as namespaces come and go. A paused replica forgets them too: only the active
    one speaks for a TokenRequest."""
    for gauge in (TOKEN_READY, TOKEN_EXPIRY):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    for reason in _failure_reasons.pop((namespace, name), set()):
        with contextlib.suppress(KeyError):
            REFRESH_FAILURES.remove(namespace, name, reason)


def serve(port: int) -> WSGIServer | None:
    """Serve /metrics on `port` (0: not at all); the server, for `stop_serving`."""
    if not port:
        return None
    server, _ = start_http_server(port)
    return server


def stop_serving(server: WSGIServer) -> None:
    """Free the port, so that a retried startup can serve it again."""
    server.shutdown()
    server.server_close()
