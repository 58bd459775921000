"""LabelSelectedWatch against the real API server: the selector is applied by the server.

Events of one watch arrive in resource-version order, so "the unlabelled Secret
created first was never reported" is shown by the labelled one created after it
arriving alone, not by waiting for something not to happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

from kubernetes import client as k8s

from m2m_token_operator.kube.reflector import ADDED, DELETED, MODIFIED, LabelSelectedWatch

SELECTOR = "app.kubernetes.io/managed-by=m2m-token-operator"
OURS = {"app.kubernetes.io/managed-by": "m2m-token-operator"}


def _secret(name: str, labels: dict[str, str]) -> k8s.V1Secret:
    return k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name, labels=labels), string_data={"k": "v"})


async def _next(queue: asyncio.Queue[tuple[str, str]]) -> tuple[str, str]:
    return await asyncio.wait_for(queue.get(), timeout=20)


async def test_only_matching_objects_arrive_and_unlabelling_is_a_deletion(
    admin_api: k8s.ApiClient, namespace: str
) -> None:
    core = k8s.CoreV1Api(admin_api)
    core.create_namespaced_secret(namespace, _secret("before", OURS))
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_event(kind: str, obj: dict[str, Any]) -> None:
        queue.put_nowait((kind, obj["metadata"]["name"]))

    watch = LabelSelectedWatch(
        name="e2e",
        lister=functools.partial(core.list_namespaced_secret, namespace),
        label_selector=SELECTOR,
        on_event=on_event,
        page_size=1,
    )
    task = asyncio.create_task(watch.run())
    try:
        assert await _next(queue) == (ADDED, "before")
        await asyncio.wait_for(watch.synced.wait(), timeout=20)

        await asyncio.to_thread(core.create_namespaced_secret, namespace, _secret("other", {}))
        await asyncio.to_thread(core.create_namespaced_secret, namespace, _secret("mine", OURS))
        assert await _next(queue) == (ADDED, "mine")  # "other" came first and was filtered

        patch = {"metadata": {"labels": {"extra": "yes"}}}
        await asyncio.to_thread(core.patch_namespaced_secret, "mine", namespace, patch)
        assert await _next(queue) == (MODIFIED, "mine")

        unlabel = {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}}
        await asyncio.to_thread(core.patch_namespaced_secret, "mine", namespace, unlabel)
        assert await _next(queue) == (DELETED, "mine")

        await asyncio.to_thread(core.delete_namespaced_secret, "before", namespace)
        assert await _next(queue) == (DELETED, "before")
        assert watch.lists == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_metadata_only_watch_never_receives_data(
    admin_api: k8s.ApiClient, namespace: str
) -> None:
    """Issue 18: a labelled Secret that is not ours costs its metadata, never its data."""
    core = k8s.CoreV1Api(admin_api)
    big = "x" * 200_000
    listed = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="listed", labels=OURS), string_data={"k": big}
    )
    core.create_namespaced_secret(namespace, listed)
    received: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    watch = LabelSelectedWatch(
        name="e2e-metadata",
        lister=functools.partial(core.list_namespaced_secret, namespace),
        label_selector=SELECTOR,
        on_event=lambda kind, obj: received.put_nowait((kind, obj)),
        metadata_only=True,
    )
    task = asyncio.create_task(watch.run())
    try:
        kind, obj = await asyncio.wait_for(received.get(), timeout=20)  # from the list
        assert (kind, obj["metadata"]["name"]) == (ADDED, "listed")
        assert obj["kind"] == "PartialObjectMetadata"
        assert "data" not in obj
        assert obj["metadata"]["labels"] == OURS
        await asyncio.wait_for(watch.synced.wait(), timeout=20)
        watched = k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="watched", labels=OURS), string_data={"k": big}
        )
        await asyncio.to_thread(core.create_namespaced_secret, namespace, watched)
        kind, obj = await asyncio.wait_for(received.get(), timeout=20)  # from the watch
        assert (kind, obj["metadata"]["name"]) == (ADDED, "watched")
        assert obj["kind"] == "PartialObjectMetadata"
        assert "data" not in obj
        assert obj["metadata"]["resourceVersion"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
