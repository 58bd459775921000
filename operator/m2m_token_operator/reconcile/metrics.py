"""Prometheus metrics: what a platform team alerts on, and no more.

Per namespace (never per TokenRequest): the soonest expiry among the tokens in
its Secrets, how many TokenRequests it has and how many have no unexpired
token, and refresh failures by reason. Per call to the token endpoint: the
result class and the latency. Per cache lookup: hit or miss.

Why per namespace: /metrics used to list every TokenRequest's name and expiry,
which told any pod that could reach it which applications exist and when each
token runs out. An alert needs to know that a namespace has a token about to
expire or no token, and whose namespace that is; `kubectl get tokreq` in that
namespace then names the TokenRequest (docs/operations.md, "Metrics"). Label
values are namespace names and reason classes only, never a token.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The Kubernetes API layer times its own calls (it must not import this module); named here
# too, so that this module lists every series the operator exports.
from m2m_token_operator.kube.api_latency import API_LATENCY as API_LATENCY
from m2m_token_operator.tokens.credentials import ClientCredentials
from m2m_token_operator.tokens.model import AccessToken, TokenEndpointError

SOONEST_EXPIRY = "m2m_token_soonest_expiry_timestamp_seconds"
TOKEN_REQUESTS = "m2m_token_requests"
NOT_READY = "m2m_token_requests_not_ready"
REFRESH_FAILURES = Counter(
    "m2m_token_refresh_failures_total",
    "Attempts that left a TokenRequest of the namespace without a fresh token, by reason.",
    ["namespace", "reason"],
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

REFRESH_LAG = Histogram(
    "m2m_refresh_lag_seconds",
    "How late scheduled work (a refresh, a retry) became ready to run, after its due time.",
    buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 900),
)
LOOK_SLOT_WAIT = Histogram(
    "m2m_look_slot_wait_seconds",
    "How long looks waited for a slot (their namespace's share, or the operator's): "
    "wait=start from due to started, wait=return from their token request's answer to "
    "going on with it.",
    ["wait"],
    buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SLOT_WAIT_TO_START = LOOK_SLOT_WAIT.labels(wait="start")
SLOT_WAIT_TO_RETURN = LOOK_SLOT_WAIT.labels(wait="return")
LOOK_ERRORS = Counter(
    "m2m_look_errors_total",
    "Looks at a TokenRequest ended by an unexpected exception (a bug; see the operator log).",
)

Fetch = Callable[[ClientCredentials, str], Awaitable[AccessToken]]


def record_look_error() -> None:
    LOOK_ERRORS.inc()


def instrument_fetch(fetch: Fetch) -> Fetch:
    """Wrap the token fetch so every call is counted and timed."""

    async def instrumented(credentials: ClientCredentials, scope: str) -> AccessToken:
        started = time.perf_counter()
        try:
            token = await fetch(credentials, scope)
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


class _TokenRequests(Collector):
    """Each TokenRequest's readiness and expiry, exported as per-namespace aggregates.

    Aggregated when scraped (one pass over the TokenRequests every scrape interval),
    not on every look: with 10,000 TokenRequests in one namespace, keeping a minimum
    current on each refresh would cost a pass per refresh.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # namespace -> name -> (ready, expiry as Unix time or None)
        self._by_namespace: dict[str, dict[str, tuple[bool, float | None]]] = {}
        self._failure_reasons: dict[str, set[str]] = {}  # namespace -> reasons counted

    def observe(self, namespace: str, name: str, ready: bool, expiry: float | None) -> None:
        with self._lock:
            self._by_namespace.setdefault(namespace, {})[name] = (ready, expiry)

    def failed(self, namespace: str, name: str, reason: str) -> None:
        with self._lock:
            self._by_namespace.setdefault(namespace, {}).setdefault(name, (False, None))
            self._failure_reasons.setdefault(namespace, set()).add(reason)

    def forget(self, namespace: str, name: str) -> set[str]:
        """Forget one; the failure reasons to drop when it was the namespace's last."""
        with self._lock:
            members = self._by_namespace.get(namespace)
            if members is None:
                return set()
            members.pop(name, None)
            if members:
                return set()
            del self._by_namespace[namespace]
            return self._failure_reasons.pop(namespace, set())

    def collect(self) -> Iterator[Metric]:
        soonest = GaugeMetricFamily(
            SOONEST_EXPIRY,
            "Unix time at which the first of the tokens in the namespace's Secrets expires"
            " (absent while none holds a token).",
            labels=["namespace"],
        )
        total = GaugeMetricFamily(
            TOKEN_REQUESTS,
            "TokenRequests the operator serves in the namespace.",
            labels=["namespace"],
        )
        not_ready = GaugeMetricFamily(
            NOT_READY,
            "TokenRequests of the namespace whose Secret holds no unexpired token.",
            labels=["namespace"],
        )
        with self._lock:
            snapshot = {ns: list(members.values()) for ns, members in self._by_namespace.items()}
        for namespace, states in sorted(snapshot.items()):
            total.add_metric([namespace], len(states))
            not_ready.add_metric([namespace], sum(1 for ready, _ in states if not ready))
            expiries = [expiry for _, expiry in states if expiry]
            if expiries:
                soonest.add_metric([namespace], min(expiries))
        yield soonest
        yield total
        yield not_ready


_TOKEN_REQUESTS = _TokenRequests()
REGISTRY.register(_TOKEN_REQUESTS)


def observe_token_request(
    namespace: str,
    name: str,
    *,
    ready: bool,
    expires_at: datetime | None,
) -> None:
    _TOKEN_REQUESTS.observe(namespace, name, ready, expires_at.timestamp() if expires_at else None)


def record_refresh_failure(namespace: str, name: str, *, reason: str) -> None:
    REFRESH_FAILURES.labels(namespace=namespace, reason=reason).inc()
    _TOKEN_REQUESTS.failed(namespace, name, reason)


def forget_token_request(namespace: str, name: str) -> None:
    """A deleted TokenRequest must not count in its namespace's gauges, and a namespace
    whose last one went must leave no series that alerts forever or piles up as
    namespaces come and go. A paused replica forgets them too: only the active one
    speaks for a TokenRequest."""
    for reason in _TOKEN_REQUESTS.forget(namespace, name):
        with contextlib.suppress(KeyError):
            REFRESH_FAILURES.remove(namespace, reason)


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
