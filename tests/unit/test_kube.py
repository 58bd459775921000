"""The Kubernetes API facade: every failure the callers must handle is a KubeError."""

from __future__ import annotations

import socket

import kubernetes
import pytest

from m2m_token_operator.kube import KubeApi, KubeError


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_unreachable_api_server_is_a_kube_error_not_a_transport_exception() -> None:
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{closed_port()}"
    configuration.retries = 0
    kube = KubeApi(kubernetes.client.ApiClient(configuration))
    try:
        with pytest.raises(KubeError) as caught:
            await kube.read_secret("shop", "orders-api")
    finally:
        kube.close()
    assert caught.value.status is None
    assert caught.value.action == "read Secret shop/orders-api"
    assert "HTTP None" in str(caught.value)
