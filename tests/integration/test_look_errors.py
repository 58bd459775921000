"""Nothing fails silently: an unexpected exception or a missing permission shows in status.

A bug is forced into the running operator (the function that renders the Secret
raises): the TokenRequest says `InternalError` (Ready False, since its Secret
holds no token yet; Degraded True), with a message that says where to look and
not what the exception said, `m2m_look_errors_total` counts it, and the look is
retried on the backoff schedule: once the bug is gone, the token is delivered.
A 403 on the Namespace watch that the operator-identity selector needs shows as
`PermissionDenied` on the TokenRequests it blocks, until the permission appears.
"""

from __future__ import annotations

import sys
from typing import Any

import prometheus_client
import pytest

from devenv.faultproxy import Fail, Rule

from .harness import CLIENT_SECRET, Kube, OperatorFactory, OperatorRun, TokenEndpoint, wait_for

NS = "shop"
NAME = "orders-api"
TARGET = {"target": {"application": "orders-api", "namespace": "orders"}}
# The exception's own text: it may hold anything, so it never reaches the status.
BUG_TEXT = "bug-text-that-stays-in-the-log"
FAILED = "look failed unexpectedly"


def _reason(kube: Kube, kind: str) -> str | None:
    condition = kube.condition(NS, NAME, kind)
    return None if condition is None else condition.get("reason")


async def test_an_unexpected_exception_in_a_look_is_reported_counted_and_retried(
    kube: Kube,
    token_endpoint: TokenEndpoint,
    operator: OperatorRun,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The operator's modules are imported afresh for each run: patch the running one's.
    reconciler = sys.modules["m2m_token_operator.reconcile.reconciler"]
    render_secret = reconciler.render_secret

    def broken(**_: Any) -> Any:
        raise RuntimeError(BUG_TEXT)

    monkeypatch.setattr(reconciler, "render_secret", broken)
    errors_before = prometheus_client.REGISTRY.get_sample_value("m2m_look_errors_total") or 0.0
    kube.create_token_request(NS, NAME, TARGET)

    await wait_for(lambda: _reason(kube, "Degraded") == "InternalError", timeout=10)
    ready = kube.condition(NS, NAME, "Ready")
    degraded = kube.condition(NS, NAME, "Degraded")
    assert ready is not None
    assert degraded is not None
    assert (ready["status"], ready["reason"]) == ("False", "InternalError")
    assert degraded["status"] == "True"
    message = degraded["message"]
    assert "RuntimeError" in message
    assert f"tokenrequest={kube.ns(NS)}/{NAME}" in message  # what to search the log for
    assert "operator's log" in message
    assert BUG_TEXT not in message
    assert kube.read_secret(NS, NAME) is None

    # Counted, and retried on the backoff schedule (0.2 s doubling here): more looks fail.
    await wait_for(lambda: sum(FAILED in line for line in operator.logs) >= 2, timeout=10)
    errors = prometheus_client.REGISTRY.get_sample_value("m2m_look_errors_total") or 0.0
    assert errors - errors_before >= 2
    status = kube.read_status(NS, NAME)
    assert status is not None
    assert status.get("failedAttempts", 0) >= 1

    # The bug is gone: the next retry delivers the token.
    monkeypatch.setattr(reconciler, "render_secret", render_secret)
    await wait_for(lambda: _reason(kube, "Ready") == "TokenIssued", timeout=10)
    secret = kube.read_secret(NS, NAME)
    assert secret is not None
    assert secret["token"] in token_endpoint.tokens
    operator.stop()
    operator.assert_never_logged(CLIENT_SECRET, *token_endpoint.tokens)


async def test_a_403_on_the_namespace_watch_is_permission_denied_until_it_is_granted(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    """The operator-identity selector needs list/watch on namespaces: without it, the
    TokenRequests using the operator's identity say PermissionDenied, not nothing."""
    forbidden = kube.proxy.add(
        Rule(Fail(403, reason="Forbidden"), method="GET", path=r"^/api/v1/namespaces$", times=None)
    )
    operator = operator_factory.start()
    kube.create_token_request(NS, NAME, TARGET)

    await wait_for(lambda: _reason(kube, "Degraded") == "PermissionDenied", timeout=10)
    ready = kube.condition(NS, NAME, "Ready")
    degraded = kube.condition(NS, NAME, "Degraded")
    assert ready is not None
    assert degraded is not None
    assert (ready["status"], ready["reason"]) == ("False", "PermissionDenied")
    assert "list and watch" in degraded["message"]
    assert "namespaces" in degraded["message"]
    assert token_endpoint.count == 0  # nothing is fetched while it is not known

    # The permission appears: the watch's next retry lists, and the token is delivered.
    kube.proxy.remove(forbidden)
    await wait_for(lambda: _reason(kube, "Ready") == "TokenIssued", timeout=40)
    degraded = kube.condition(NS, NAME, "Degraded")
    assert degraded is not None
    assert degraded["status"] == "False"
    assert kube.read_secret(NS, NAME) is not None
    operator.stop()
