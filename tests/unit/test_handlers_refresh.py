"""The Kopf side of a forced refresh: a new m2m.dev/refresh value reaches the reconciler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import kopf

from m2m_token_operator.app import handlers

# Kopf's decorator types the handler as its own protocol; call it as the plain coroutine it is.
refresh_annotation = cast(Callable[..., Awaitable[None]], handlers.refresh_annotation)


class RecordingReconciler:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []

    def refresh_requested(self, namespace: str, name: str, value: str) -> None:
        self.requests.append((namespace, name, value))


def body(annotations: dict[str, str], status: dict[str, Any] | None = None) -> kopf.Body:
    raw = {
        "metadata": {"namespace": "shop", "name": "orders-api", "annotations": annotations},
        "status": status or {},
    }
    return kopf.Body(cast(Any, raw))


async def test_a_new_value_is_handed_to_the_reconciler() -> None:
    reconciler = RecordingReconciler()
    memo = kopf.Memo(reconciler=reconciler)
    asked = body({"m2m.dev/refresh": "2026-11-29T09:00:00Z"}, {"lastRefreshRequest": "older"})
    assert handlers._refresh_asked(body=asked)
    await refresh_annotation(type="MODIFIED", body=asked, memo=memo)
    assert reconciler.requests == [("shop", "orders-api", "2026-11-29T09:00:00Z")]


async def test_a_handled_value_or_a_deletion_is_not() -> None:
    reconciler = RecordingReconciler()
    memo = kopf.Memo(reconciler=reconciler)
    handled = body({"m2m.dev/refresh": "v1"}, {"lastRefreshRequest": "v1"})
    assert not handlers._refresh_asked(body=handled)
    await refresh_annotation(type="MODIFIED", body=handled, memo=memo)
    await refresh_annotation(type="DELETED", body=body({"m2m.dev/refresh": "v2"}), memo=memo)
    assert not handlers._refresh_asked(body=body({}))
    assert reconciler.requests == []


async def test_a_long_value_is_handed_over_in_its_recorded_form() -> None:
    reconciler = RecordingReconciler()
    memo = kopf.Memo(reconciler=reconciler)
    await refresh_annotation(type=None, body=body({"m2m.dev/refresh": "x" * 1000}), memo=memo)
    [(_, _, value)] = reconciler.requests
    assert value.startswith("sha256:")
