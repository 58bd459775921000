"""Which TokenRequests still exist: the deletions that Kopf's watch can miss.

Kopf lists again after `410 Gone` (and after a watch it cannot resume) without
emitting `DELETED` for the objects that vanished in between, and it offers no
hook on that re-list. An object deleted in such a gap would stay in the
registry and be served for ever: its Secret, deleted by the garbage collector,
re-created at each look. So the operator runs a watch of its own on
TokenRequests, a `LabelSelectedWatch` (without a selector) that asks for
metadata only (`as=PartialObjectMetadata`): on `410 Gone` it lists again and
reports what the list no longer holds as `DELETED`, which Kopf does not.

`TokenRequestPresence` keeps the one thing needed to name what went away: the
uid at each name as this watch last showed it. It reports a uid as gone when
this watch sees it deleted, vanished from a re-list, or replaced by another uid
under the same name. Each of those is certain within one watch stream (events
come in the API server's order and uids are never reused), so the registry
forgets exactly that uid and never an object that Kopf learnt meanwhile. It
never forgets a uid for being absent: this watch may lag behind Kopf's.

Cost to the API server: one metadata-only list at start (paged) and one watch
connection, whose events are the TokenRequests' own changes (mostly the
operator's status writes). A look adds no request: its uid check before a
write is the registry's, in memory.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import kubernetes

from m2m_token_operator.api.constants import GROUP, PLURAL, VERSION
from m2m_token_operator.kube.namespace_match import namespace_matcher
from m2m_token_operator.kube.reflector import DELETED, METADATA_WATCH_ACCEPT, LabelSelectedWatch
from m2m_token_operator.kube.secret_watches import served_namespaces

logger = logging.getLogger(__name__)

# Metadata only: a TokenRequest's spec and status never cross the wire twice.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"

ObjectRef = tuple[str, str]  # (namespace, name)


class GoneHandler(Protocol):
    def __call__(self, namespace: str, name: str, uid: str, *, why: str) -> None: ...


def metadata_only(list_function: Callable[..., Any]) -> Callable[..., Any]:
    """The lister of a `LabelSelectedWatch`, asking for metadata only (list and watch)."""

    def lister(**arguments: Any) -> Any:
        accept = METADATA_WATCH_ACCEPT if arguments.get("watch") else METADATA_LIST
        return list_function(**arguments, _headers={"Accept": accept})

    return lister


class TokenRequestPresence:
    """The uid at each TokenRequest name, as the watch last showed it; reports uids gone."""

    def __init__(self, *, on_gone: GoneHandler, serves: Callable[[str], bool]) -> None:
        self._on_gone = on_gone
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
                self._gone(ref, uid, why="deleted")
            elif previous:
                # After a re-list the watch names what vanished, without its uid.
                self._gone(ref, previous, why="gone from the TokenRequest list after a watch gap")
            return
        if not uid:
            return
        self._uids[ref] = uid
        if previous and previous != uid:
            self._gone(ref, previous, why="replaced by a new object under the same name")

    def _gone(self, ref: ObjectRef, uid: str, *, why: str) -> None:
        namespace, name = ref
        logger.debug("TokenRequest %s/%s uid %s: %s", namespace, name, uid, why)
        self._on_gone(namespace, name, uid, why=why)


def build(
    api_client: kubernetes.client.ApiClient, on_gone: GoneHandler, *, environ: Mapping[str, str]
) -> tuple[TokenRequestPresence, list[LabelSelectedWatch]]:
    """The presence and its watches for the namespaces served (as the Secret watches do)."""
    patterns = served_namespaces(environ)
    presence = TokenRequestPresence(on_gone=on_gone, serves=namespace_matcher(patterns))
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
            lister=metadata_only(lister),
            label_selector="",
            on_event=presence.on_event,
        )
        for where, lister in listers
    ]
    return presence, watches
