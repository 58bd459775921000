"""TokenRequestPresence: which uids a TokenRequest watch shows gone, and nothing else.

The watch itself (re-list after 410, vanished objects as DELETED) is covered in
test_reflector.py; the whole path on a real API server in
tests/integration/test_api_faults.py.
"""

from __future__ import annotations

from typing import Any

from m2m_token_operator.kube.kube_api import _without_nulls
from m2m_token_operator.kube.presence import (
    METADATA_LIST,
    TokenRequestPresence,
    metadata_only,
)
from m2m_token_operator.kube.reflector import ADDED, DELETED, METADATA_WATCH_ACCEPT, MODIFIED


def _obj(name: str, uid: str | None, namespace: str = "shop") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if uid is not None:
        metadata["uid"] = uid
    return {"metadata": metadata}


def _presence(
    serves: Any = lambda _: True,
) -> tuple[TokenRequestPresence, list[tuple[str, str, str, str]]]:
    gone: list[tuple[str, str, str, str]] = []

    def on_gone(namespace: str, name: str, uid: str, *, why: str) -> None:
        gone.append((namespace, name, uid, why))

    return TokenRequestPresence(on_gone=on_gone, serves=serves), gone


def test_a_deleted_event_reports_its_uid() -> None:
    presence, gone = _presence()
    presence.on_event(ADDED, _obj("orders", "u1"))
    presence.on_event(MODIFIED, _obj("orders", "u1"))
    assert gone == []
    presence.on_event(DELETED, _obj("orders", "u1"))
    assert gone == [("shop", "orders", "u1", "deleted")]
    assert presence.uid("shop", "orders") is None


def test_a_tombstone_after_a_relist_reports_the_uid_last_seen() -> None:
    """LabelSelectedWatch's tombstones carry a name only: the uid comes from here."""
    presence, gone = _presence()
    presence.on_event(ADDED, _obj("orders", "u1"))
    presence.on_event(DELETED, _obj("orders", None))
    assert gone == [("shop", "orders", "u1", "gone from the TokenRequest list after a watch gap")]


def test_a_new_uid_under_the_same_name_reports_the_old_one() -> None:
    presence, gone = _presence()
    presence.on_event(ADDED, _obj("orders", "u1"))
    presence.on_event(MODIFIED, _obj("orders", "u2"))  # deleted and re-created in a gap
    assert gone == [("shop", "orders", "u1", "replaced by a new object under the same name")]
    assert presence.uid("shop", "orders") == "u2"


def test_never_reports_what_it_never_saw_nor_other_namespaces() -> None:
    """Absence proves nothing (this watch may lag behind Kopf's): only a seen uid goes."""
    presence, gone = _presence(serves=lambda namespace: namespace == "shop")
    presence.on_event(DELETED, _obj("unknown", None))
    presence.on_event(ADDED, _obj("orders", "u1", namespace="elsewhere"))
    presence.on_event(DELETED, _obj("orders", "u1", namespace="elsewhere"))
    assert gone == []
    assert len(presence) == 0


def test_the_watch_asks_for_metadata_only() -> None:
    calls: list[dict[str, Any]] = []
    lister = metadata_only(lambda **arguments: calls.append(arguments))
    lister(label_selector="", limit=500)
    lister(label_selector="", watch=True, resource_version="7")
    assert calls[0]["_headers"] == {"Accept": METADATA_LIST}
    assert calls[1]["_headers"] == {"Accept": METADATA_WATCH_ACCEPT}


def test_the_status_sent_leaves_out_null_members_as_a_merge_patch_would() -> None:
    status = {
        "expiresAt": None,
        "failedAttempts": 0,
        "token": {"roles": None, "aud": "api://x"},
        "conditions": [{"type": "Ready", "message": None, "status": "False"}],
    }
    assert _without_nulls(status) == {
        "failedAttempts": 0,
        "token": {"aud": "api://x"},
        "conditions": [{"type": "Ready", "status": "False"}],
    }
