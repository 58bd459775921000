"""The operator's one watch of TokenRequests, and what each of its events means.

Kopf's per-object machinery (cause detection, body and diff views, per-object
workers and their queues, a log line per handler run) cost about a quarter of
the operator's CPU per TokenRequest in a burst, for events that need none of
it: the reconciler only learns the object and schedules a look. And Kopf lists
again after `410 Gone` without emitting `DELETED` for what vanished meanwhile,
so a second, metadata-only watch had to run beside it to catch those. One
`LabelSelectedWatch` (without a selector) now does both jobs: its re-list
reports what vanished, and it hands each object to the reconciler as plain
JSON, decoded once, off the event loop.

`TokenRequestFeed` keeps the one thing needed to name what went away: the uid
at each name as the watch last showed it. It reports a uid as gone when the
watch shows it deleted, vanished from a re-list, or replaced by another uid
under the same name; each is certain within one stream (events come in the API
server's order and uids are never reused). Every other event is handed on:
an object being deleted (`deletionTimestamp`) stops being served, anything
else is observed (the reconciler decides whether its spec is new), and a new
`m2m.dev/refresh` value asks for a refresh.

Kopf still runs the process: startup and cleanup, the liveness probe, and the
peering (whose pauses the scheduler's gate follows, not this watch: a paused
replica keeps learning, so that it has nothing to catch up when it resumes).

Cost to the API server: one paged list at start and one watch connection per
served namespace (one for all namespaces), whose events are the TokenRequests'
own changes (mostly the operator's status writes).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import kubernetes

from m2m_token_operator.api.constants import GROUP, PLURAL, VERSION, JsonObject
from m2m_token_operator.api.refresh_annotation import pending_request
from m2m_token_operator.kube.namespace_match import namespace_matcher
from m2m_token_operator.kube.reflector import DELETED, LabelSelectedWatch
from m2m_token_operator.kube.secret_watches import served_namespaces

logger = logging.getLogger(__name__)

ObjectRef = tuple[str, str]  # (namespace, name)


class TokenRequestEvents(Protocol):
    """What the reconciler is told (`TokenRequestReconciler` has these methods)."""

    def observed(self, body: Mapping[str, Any]) -> None: ...

    def being_deleted(self, namespace: str, name: str, uid: str | None) -> None: ...

    def forget(
        self, namespace: str, name: str, uid: str | None = None, *, why: str | None = None
    ) -> None: ...

    def refresh_requested(self, namespace: str, name: str, value: str) -> None: ...


def learnt_part(obj: Mapping[str, Any]) -> JsonObject:
    """The part of a TokenRequest the reconciler keeps: not managedFields, labels and the like.

    No copy: each watch event's object is decoded afresh and nobody else holds it.
    """
    metadata = obj.get("metadata") or {}
    return {
        "metadata": {
            "namespace": metadata.get("namespace"),
            "name": metadata.get("name"),
            "uid": metadata.get("uid"),
            "generation": metadata.get("generation"),
            # m2m.dev/refresh: a value set while the operator was down is seen at start.
            "annotations": metadata.get("annotations") or {},
            "deletionTimestamp": metadata.get("deletionTimestamp"),
        },
        "spec": obj.get("spec") or {},
        "status": obj.get("status") or {},
    }


class TokenRequestFeed:
    """The watch's events, turned into what the reconciler must do; see the module docstring."""

    def __init__(self, *, to: TokenRequestEvents, serves: Callable[[str], bool]) -> None:
        self._to = to
        self._serves = serves
        self._uids: dict[ObjectRef, str] = {}

    def __len__(self) -> int:
        return len(self._uids)

    def uid(self, namespace: str, name: str) -> str | None:
        return self._uids.get((namespace, name))

    def on_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        metadata = obj.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "")
        name = str(metadata.get("name") or "")
        if not self._serves(namespace):
            return
        ref = (namespace, name)
        uid = str(metadata.get("uid") or "")
        previous = self._uids.get(ref)
        if kind == DELETED:
            self._uids.pop(ref, None)
            if previous and uid and previous != uid:
                self._gone(ref, previous, why="replaced")
            if uid:
                self._to.forget(namespace, name, uid)
            elif previous:
                # After a re-list the watch names what vanished, without its uid.
                self._gone(ref, previous, why="gone from the TokenRequest list after a watch gap")
            return
        if not uid:
            return
        self._uids[ref] = uid
        if previous and previous != uid:
            self._gone(ref, previous, why="replaced by a new object under the same name")
        if metadata.get("deletionTimestamp"):
            self._to.being_deleted(namespace, name, uid)
            return
        self._to.observed(learnt_part(obj))  # learns and schedules: the look is the scheduler's
        # After learning: a value already pending when the object is first seen is found
        # by learning it; this tells a known object about a value set since.
        value = pending_request(metadata.get("annotations"), obj.get("status"))
        if value is not None:
            self._to.refresh_requested(namespace, name, value)

    def _gone(self, ref: ObjectRef, uid: str, *, why: str) -> None:
        namespace, name = ref
        logger.debug("TokenRequest %s/%s uid %s: %s", namespace, name, uid, why)
        self._to.forget(namespace, name, uid, why=why)


def build(
    api_client: kubernetes.client.ApiClient,
    to: TokenRequestEvents,
    *,
    environ: Mapping[str, str],
) -> tuple[TokenRequestFeed, list[LabelSelectedWatch]]:
    """The feed and its watches for the namespaces served (as the Secret watches do)."""
    patterns = served_namespaces(environ)
    feed = TokenRequestFeed(to=to, serves=namespace_matcher(patterns))
    # Any glob (or '!') needs the cluster-wide watch, filtered here by `serves`.
    namespaced = bool(patterns) and not any(c in p for p in patterns for c in "*?[!,")
    custom = kubernetes.client.CustomObjectsApi(api_client)
    listers: list[tuple[str, Callable[..., Any]]]
    if namespaced:
        listers = [
            (
                namespace,
                functools.partial(
                    custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL
                ),
            )
            for namespace in patterns
        ]
    else:
        listers = [
            ("all", functools.partial(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL))
        ]
    watches = [
        LabelSelectedWatch(
            name=f"tokenrequests/{where}",
            lister=lister,
            label_selector="",
            on_event=feed.on_event,
        )
        for where, lister in listers
    ]
    return feed, watches
