"""Metrics: endpoint calls by result with latency, per-TokenRequest gauges that go away."""

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from m2m_token_operator.reconcile import metrics
from m2m_token_operator.tokens.credentials import ClientCredentials, secret_credentials
from m2m_token_operator.tokens.model import AccessToken, Throttled

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
CREDENTIALS = secret_credentials(
    token_endpoint="https://login.example/token",
    client_id="id",
    client_secret="secret-value-123",
    source="operator identity",
)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_fetches_are_counted_by_result_and_timed() -> None:
    token = AccessToken(value="t" * 10, token_type="Bearer", issued_at=NOW, expires_at=NOW)

    async def succeed(credentials: ClientCredentials, scope: str) -> AccessToken:
        return token

    async def throttle(credentials: ClientCredentials, scope: str) -> AccessToken:
        raise Throttled("slow down")

    before_ok = sample("m2m_token_endpoint_requests_total", {"result": "success"})
    before_429 = sample("m2m_token_endpoint_requests_total", {"result": "Throttled"})
    before_count = sample("m2m_token_endpoint_request_duration_seconds_count")
    assert await metrics.instrument_fetch(succeed)(CREDENTIALS, "api://a.b.c/.default") is token
    with pytest.raises(Throttled):
        await metrics.instrument_fetch(throttle)(CREDENTIALS, "api://a.b.c/.default")
    assert sample("m2m_token_endpoint_requests_total", {"result": "success"}) == before_ok + 1
    assert sample("m2m_token_endpoint_requests_total", {"result": "Throttled"}) == before_429 + 1
    assert sample("m2m_token_endpoint_request_duration_seconds_count") == before_count + 2


def test_namespace_gauges_aggregate_their_token_requests_and_go_away() -> None:
    ns = {"namespace": "shop"}
    soon, later = NOW + timedelta(minutes=10), NOW + timedelta(hours=1)
    metrics.observe_token_request("shop", "orders", ready=True, expires_at=later)
    metrics.observe_token_request("shop", "billing", ready=True, expires_at=soon)
    metrics.observe_token_request("shop", "new", ready=False, expires_at=None)
    assert sample("m2m_token_requests", ns) == 3
    assert sample("m2m_token_requests_not_ready", ns) == 1
    assert sample("m2m_token_soonest_expiry_timestamp_seconds", ns) == soon.timestamp()
    # Refreshed: the soonest is now another's.
    metrics.observe_token_request("shop", "billing", ready=True, expires_at=later)
    assert sample("m2m_token_soonest_expiry_timestamp_seconds", ns) == later.timestamp()

    metrics.forget_token_request("shop", "orders")
    metrics.forget_token_request("shop", "billing")
    assert sample("m2m_token_requests", ns) == 1
    assert REGISTRY.get_sample_value("m2m_token_soonest_expiry_timestamp_seconds", ns) is None
    metrics.forget_token_request("shop", "new")
    assert REGISTRY.get_sample_value("m2m_token_requests", ns) is None
    metrics.forget_token_request("shop", "new")  # twice is fine


def test_no_series_names_a_token_request() -> None:
    # Issue 18: /metrics told any pod every TokenRequest's name and expiry.
    metrics.observe_token_request("shop", "secret-project-x", ready=True, expires_at=NOW)
    metrics.record_refresh_failure("shop", "secret-project-x", reason="Throttled")
    for family in REGISTRY.collect():
        for found in family.samples:
            assert "name" not in found.labels, found
            assert "secret-project-x" not in found.labels.values(), found
    metrics.forget_token_request("shop", "secret-project-x")


def test_cache_lookups_and_refresh_failures() -> None:
    hits = sample("m2m_token_cache_lookups_total", {"result": "hit"})
    misses = sample("m2m_token_cache_lookups_total", {"result": "miss"})
    metrics.record_cache_lookup(fetched=False)
    metrics.record_cache_lookup(fetched=True)
    assert sample("m2m_token_cache_lookups_total", {"result": "hit"}) == hits + 1
    assert sample("m2m_token_cache_lookups_total", {"result": "miss"}) == misses + 1
    labels = {"namespace": "shop", "reason": "Throttled"}
    failures = sample("m2m_token_refresh_failures_total", labels)
    metrics.record_refresh_failure("shop", "orders", reason="Throttled")
    assert sample("m2m_token_refresh_failures_total", labels) == failures + 1
    metrics.forget_token_request("shop", "orders")


def test_a_namespace_whose_last_token_request_goes_drops_its_failure_counters() -> None:
    """TokenRequests come and go (preview namespaces): their series must not pile up."""
    metrics.record_refresh_failure("preview-7", "orders-api", reason="Throttled")
    metrics.record_refresh_failure("preview-7", "orders-api", reason="EndpointUnavailable")
    metrics.record_refresh_failure("preview-7", "kept", reason="Throttled")
    labels = {"namespace": "preview-7", "reason": "Throttled"}
    assert sample("m2m_token_refresh_failures_total", labels) == 2
    metrics.forget_token_request("preview-7", "orders-api")
    assert sample("m2m_token_refresh_failures_total", labels) == 2  # "kept" is still there
    metrics.forget_token_request("preview-7", "kept")
    assert REGISTRY.get_sample_value("m2m_token_refresh_failures_total", labels) is None
    unavailable = {"namespace": "preview-7", "reason": "EndpointUnavailable"}
    assert REGISTRY.get_sample_value("m2m_token_refresh_failures_total", unavailable) is None
