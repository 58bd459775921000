"""The timing metrics of the dashboard: refresh lag, and the latency of our API calls."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta

import kubernetes
import pytest
from prometheus_client import REGISTRY

from m2m_token_operator.kube.kube_api import KubeApi, KubeError
from m2m_token_operator.reconcile.scheduler import Scheduler

NOW = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_work_that_runs_late_is_observed_as_refresh_lag() -> None:
    handled = asyncio.Event()

    async def handle(target: str) -> None:
        handled.set()

    scheduler: Scheduler[str] = Scheduler(clock=lambda: NOW, handle=handle)
    scheduler.schedule("shop/orders", NOW - timedelta(seconds=7))
    count = sample("m2m_refresh_lag_seconds_count")
    total = sample("m2m_refresh_lag_seconds_sum")
    late = sample("m2m_refresh_lag_seconds_bucket", {"le": "15.0"}) - sample(
        "m2m_refresh_lag_seconds_bucket", {"le": "5.0"}
    )
    running = asyncio.create_task(scheduler.run())
    try:
        await asyncio.wait_for(handled.wait(), timeout=10)
    finally:
        running.cancel()
    assert sample("m2m_refresh_lag_seconds_count") == count + 1
    assert sample("m2m_refresh_lag_seconds_sum") == pytest.approx(total + 7)
    after = sample("m2m_refresh_lag_seconds_bucket", {"le": "15.0"}) - sample(
        "m2m_refresh_lag_seconds_bucket", {"le": "5.0"}
    )
    assert after == late + 1


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_api_calls_are_timed_by_verb_and_kind_even_when_they_fail() -> None:
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{closed_port()}"
    configuration.retries = 0
    kube = KubeApi(kubernetes.client.ApiClient(configuration))
    labels = {"call": "read Secret"}
    before = sample("m2m_kube_api_request_duration_seconds_count", labels)
    try:
        with pytest.raises(KubeError):
            await kube.read_secret("shop", "orders-api")
    finally:
        kube.close()
    # One series per verb and kind, never per object: the name is not a label.
    assert sample("m2m_kube_api_request_duration_seconds_count", labels) == before + 1
