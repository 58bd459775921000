"""The Kubernetes API facade: every failure the callers must handle is a KubeError."""

from __future__ import annotations

import json
import socket
from typing import Any

import kubernetes
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from m2m_token_operator.kube import kube_api
from m2m_token_operator.kube.kube_api import JSON_PATCH, KubeApi, KubeError


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


STATUS_PATH = "/apis/m2m.dev/v1alpha1/namespaces/shop/tokenrequests/orders-api/status"
OBJECT_PATH = "/apis/m2m.dev/v1alpha1/namespaces/shop/tokenrequests/orders-api"
# The API server's answer to a JSON Patch whose `test` fails (checked on v1.37): no detail.
TEST_FAILED = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "the server rejected our request due to an error in our request",
    "reason": "Invalid",
    "details": {},
    "code": 422,
}


def _api(httpserver: HTTPServer) -> KubeApi:
    configuration = kubernetes.client.Configuration()
    configuration.host = httpserver.url_for("").rstrip("/")
    configuration.retries = 0
    return KubeApi(kubernetes.client.ApiClient(configuration))


def _object(uid: str) -> dict[str, Any]:
    return {"metadata": {"name": "orders-api", "namespace": "shop", "uid": uid}}


async def test_the_status_patch_tests_the_uid_and_sends_the_status_without_nulls(
    httpserver: HTTPServer,
) -> None:
    sent: list[tuple[str, Any]] = []

    def record(request: Request) -> Response:
        sent.append((request.headers["Content-Type"], json.loads(request.data)))
        return Response(json.dumps(_object("u1")), content_type="application/json")

    httpserver.expect_request(STATUS_PATH, method="PATCH").respond_with_handler(record)
    kube = _api(httpserver)
    try:
        written = await kube.patch_token_request_status(
            "shop", "orders-api", {"scope": "s", "expiresAt": None}, uid="u1"
        )
    finally:
        kube.close()
    assert written
    assert sent == [
        (
            JSON_PATCH,
            [
                {"op": "test", "path": "/metadata/uid", "value": "u1"},
                {"op": "add", "path": "/status", "value": {"scope": "s"}},
            ],
        )
    ]


@pytest.mark.parametrize(
    ("current", "written"),
    [
        (None, False),  # deleted: gone
        (_object("u2"), False),  # another object under the name: replaced
        (_object("u1"), None),  # the same object: the status itself was refused (an error)
    ],
)
async def test_a_refused_status_patch_is_told_apart_by_one_read(
    httpserver: HTTPServer, current: dict[str, Any] | None, written: bool | None
) -> None:
    httpserver.expect_request(STATUS_PATH, method="PATCH").respond_with_json(
        TEST_FAILED, status=422
    )
    if current is None:
        httpserver.expect_request(OBJECT_PATH, method="GET").respond_with_json(
            {"kind": "Status", "code": 404, "reason": "NotFound"}, status=404
        )
    else:
        httpserver.expect_request(OBJECT_PATH, method="GET").respond_with_json(current)
    kube = _api(httpserver)
    try:
        if written is None:
            with pytest.raises(KubeError) as caught:
                await kube.patch_token_request_status("shop", "orders-api", {}, uid="u1")
            assert caught.value.status == 422
        else:
            assert not await kube.patch_token_request_status("shop", "orders-api", {}, uid="u1")
    finally:
        kube.close()


def test_the_facade_keeps_every_call_of_its_pieces() -> None:
    """Callers hold one `KubeApi`: the coordination and event calls are still its own."""
    assert issubclass(KubeApi, kube_api.CoordinationCalls)
    assert issubclass(KubeApi, kube_api.EventCalls)
    for call in (
        "read_lease",
        "create_lease",
        "replace_lease",
        "read_cluster_peering",
        "create_cluster_peering",
        "post_events",
        "drop_pending_events",
        "create_event",
        "read_secret",
        "patch_token_request_status",
        "mint_service_account_token",
    ):
        assert callable(getattr(KubeApi, call))


async def test_close_stops_the_event_queue_and_the_calls() -> None:
    kube = KubeApi(kubernetes.client.ApiClient(kubernetes.client.Configuration()), max_workers=2)
    kube.close()
    kube.post_events("shop", [{"reason": "Dropped"}])  # after close: dropped, not queued
    assert not kube._events.busy
    assert kube.closed


def test_the_status_sent_leaves_out_null_members_as_a_merge_patch_would() -> None:
    status = {
        "expiresAt": None,
        "failedAttempts": 0,
        "token": {"roles": None, "aud": "api://x"},
        "conditions": [{"type": "Ready", "message": None, "status": "False"}],
    }
    assert kube_api._without_nulls(status) == {
        "failedAttempts": 0,
        "token": {"aud": "api://x"},
        "conditions": [{"type": "Ready", "status": "False"}],
    }


@pytest.mark.parametrize(
    ("segment", "sent"),
    [
        ("orders-api.v2", "orders-api.v2"),  # a Kubernetes name: as it is
        ("a/b", "a%2Fb"),  # never a second path segment
        ("..", ".."),  # unreserved characters, as RFC 3986 has them
        ("x?watch=1", "x%3Fwatch%3D1"),  # never a query
        ("é ü", "%C3%A9%20%C3%BC"),
    ],
)
def test_a_path_segment_is_quoted_unless_it_is_plain(segment: str, sent: str) -> None:
    assert kube_api._path("api", "v1", "namespaces", segment) == f"/api/v1/namespaces/{sent}"
