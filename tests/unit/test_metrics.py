"""Metrics: endpoint calls by result with latency, per-TokenRequest gauges that go away."""

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from m2m_token_operator import metrics
from m2m_token_operator.credentials import ClientCredentials, secret_credentials
from m2m_token_operator.tokens import AccessToken, Throttled

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
CREDENTIALS = secret_credentials(
    token_endpoint="https://login.example/token",
    client_id="id",
    client_secret="secret-value-123",
    source="operator identity",
)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_fetches_are_counted_by_result_and_timed() -> None:
    token = AccessToken(value="t" * 10, token_type="Bearer", issued_at=NOW, expires_at=NOW)

    def succeed(credentials: ClientCredentials, scope: str) -> AccessToken:
        return token

    def throttle(credentials: ClientCredentials, scope: str) -> AccessToken:
        raise Throttled("slow down")

    before_ok = sample("m2m_token_endpoint_requests_total", {"result": "success"})
    before_429 = sample("m2m_token_endpoint_requests_total", {"result": "Throttled"})
    before_count = sample("m2m_token_endpoint_request_duration_seconds_count")
    assert metrics.instrument_fetch(succeed)(CREDENTIALS, "api://a.b.c/.default") is token
    with pytest.raises(Throttled):
        metrics.instrument_fetch(throttle)(CREDENTIALS, "api://a.b.c/.default")
    assert sample("m2m_token_endpoint_requests_total", {"result": "success"}) == before_ok + 1
    assert sample("m2m_token_endpoint_requests_total", {"result": "Throttled"}) == before_429 + 1
    assert sample("m2m_token_endpoint_request_duration_seconds_count") == before_count + 2


def test_token_request_gauges_and_their_removal() -> None:
    labels = {"namespace": "shop", "name": "orders"}
    expires = NOW + timedelta(hours=1)
    metrics.observe_token_request("shop", "orders", ready=True, expires_at=expires)
    assert sample("m2m_token_ready", labels) == 1
    assert sample("m2m_token_expiry_timestamp_seconds", labels) == expires.timestamp()
    metrics.observe_token_request("shop", "orders", ready=False, expires_at=None)
    assert sample("m2m_token_ready", labels) == 0
    metrics.forget_token_request("shop", "orders")
    assert REGISTRY.get_sample_value("m2m_token_ready", labels) is None
    metrics.forget_token_request("shop", "orders")  # twice is fine


def test_cache_lookups_and_refresh_failures() -> None:
    hits = sample("m2m_token_cache_lookups_total", {"result": "hit"})
    misses = sample("m2m_token_cache_lookups_total", {"result": "miss"})
    metrics.record_cache_lookup(fetched=False)
    metrics.record_cache_lookup(fetched=True)
    assert sample("m2m_token_cache_lookups_total", {"result": "hit"}) == hits + 1
    assert sample("m2m_token_cache_lookups_total", {"result": "miss"}) == misses + 1
    labels = {"namespace": "shop", "name": "orders", "reason": "Throttled"}
    failures = sample("m2m_token_refresh_failures_total", labels)
    metrics.record_refresh_failure("shop", "orders", reason="Throttled")
    assert sample("m2m_token_refresh_failures_total", labels) == failures + 1


def test_forgetting_a_token_request_drops_its_failure_counters_too() -> None:
    """TokenRequests come and go (preview namespaces): their series must not pile up."""
    metrics.record_refresh_failure("preview-7", "orders-api", reason="Throttled")
    metrics.record_refresh_failure("preview-7", "orders-api", reason="EndpointUnavailable")
    metrics.record_refresh_failure("preview-7", "kept", reason="Throttled")
    labels = {"namespace": "preview-7", "name": "orders-api", "reason": "Throttled"}
    assert sample("m2m_token_refresh_failures_total", labels) == 1
    metrics.forget_token_request("preview-7", "orders-api")
    assert REGISTRY.get_sample_value("m2m_token_refresh_failures_total", labels) is None
    other = {"namespace": "preview-7", "name": "kept", "reason": "Throttled"}
    assert sample("m2m_token_refresh_failures_total", other) == 1
