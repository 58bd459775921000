"""TokenRequestFeed: what each TokenRequest watch event tells the reconciler, and nothing else.

The watch itself (re-list after 410, vanished objects as DELETED) is covered in
test_reflector.py; the whole path on a real API server in
tests/integration/test_api_faults.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from m2m_token_operator.kube.reflector import ADDED, DELETED, MODIFIED
from m2m_token_operator.kube.token_request_watch import TokenRequestFeed, learnt_part

GAP = "gone from the TokenRequest list after a watch gap"
REPLACED = "replaced by a new object under the same name"


class Recorder:
    """The reconciler's side, as calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def observed(self, body: Mapping[str, Any]) -> None:
        metadata = body["metadata"]
        self.calls.append(("observed", metadata["name"], metadata["uid"]))

    def being_deleted(self, namespace: str, name: str, uid: str | None) -> None:
        self.calls.append(("being_deleted", name, uid))

    def forget(
        self, namespace: str, name: str, uid: str | None = None, *, why: str | None = None
    ) -> None:
        self.calls.append(("forget", name, uid, why))

    def refresh_requested(self, namespace: str, name: str, value: str) -> None:
        self.calls.append(("refresh", name, value))


def _obj(
    name: str,
    uid: str | None,
    namespace: str = "shop",
    *,
    annotations: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if uid is not None:
        metadata["uid"] = uid
    if annotations is not None:
        metadata["annotations"] = annotations
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-06T10:00:00Z"
    return {"metadata": metadata, "spec": {}, "status": status or {}}


def _feed(serves: Any = lambda _: True) -> tuple[TokenRequestFeed, Recorder]:
    recorder = Recorder()
    return TokenRequestFeed(to=recorder, serves=serves), recorder


def test_added_and_modified_objects_are_observed_and_a_deletion_forgets_its_uid() -> None:
    feed, recorder = _feed()
    feed.on_event(ADDED, _obj("orders", "u1"))
    feed.on_event(MODIFIED, _obj("orders", "u1"))
    feed.on_event(DELETED, _obj("orders", "u1"))
    assert recorder.calls == [
        ("observed", "orders", "u1"),
        ("observed", "orders", "u1"),
        ("forget", "orders", "u1", None),
    ]
    assert feed.uid("shop", "orders") is None


def test_an_object_being_deleted_is_not_observed() -> None:
    feed, recorder = _feed()
    feed.on_event(MODIFIED, _obj("orders", "u1", deleting=True))
    assert recorder.calls == [("being_deleted", "orders", "u1")]


def test_a_tombstone_after_a_relist_forgets_the_uid_last_seen() -> None:
    """LabelSelectedWatch's tombstones carry a name only: the uid comes from here."""
    feed, recorder = _feed()
    feed.on_event(ADDED, _obj("orders", "u1"))
    feed.on_event(DELETED, _obj("orders", None))
    assert recorder.calls[-1] == ("forget", "orders", "u1", GAP)


def test_a_new_uid_under_the_same_name_forgets_the_old_one_then_observes_the_new() -> None:
    feed, recorder = _feed()
    feed.on_event(ADDED, _obj("orders", "u1"))
    feed.on_event(MODIFIED, _obj("orders", "u2"))  # deleted and re-created in a gap
    assert recorder.calls[1:] == [
        ("forget", "orders", "u1", REPLACED),
        ("observed", "orders", "u2"),
    ]
    assert feed.uid("shop", "orders") == "u2"


def test_never_forgets_what_it_never_saw_nor_serves_other_namespaces() -> None:
    feed, recorder = _feed(serves=lambda namespace: namespace == "shop")
    feed.on_event(DELETED, _obj("unknown", None))
    feed.on_event(ADDED, _obj("orders", "u1", namespace="elsewhere"))
    feed.on_event(DELETED, _obj("orders", "u1", namespace="elsewhere"))
    assert recorder.calls == []
    assert len(feed) == 0


def test_a_new_refresh_value_is_handed_on_after_the_object_is_observed() -> None:
    feed, recorder = _feed()
    asked = {"m2m.dev/refresh": "2026-11-29T09:00:00Z"}
    feed.on_event(
        MODIFIED, _obj("orders", "u1", annotations=asked, status={"lastRefreshRequest": "x"})
    )
    assert recorder.calls == [
        ("observed", "orders", "u1"),
        ("refresh", "orders", "2026-11-29T09:00:00Z"),
    ]


def test_a_handled_refresh_value_or_a_deleted_object_asks_for_nothing() -> None:
    feed, recorder = _feed()
    handled = {"m2m.dev/refresh": "v1"}
    feed.on_event(
        MODIFIED, _obj("orders", "u1", annotations=handled, status={"lastRefreshRequest": "v1"})
    )
    feed.on_event(DELETED, _obj("orders", "u1", annotations={"m2m.dev/refresh": "v2"}))
    assert [call[0] for call in recorder.calls] == ["observed", "forget"]


def test_a_long_refresh_value_is_handed_on_in_its_recorded_form() -> None:
    feed, recorder = _feed()
    feed.on_event(ADDED, _obj("orders", "u1", annotations={"m2m.dev/refresh": "x" * 1000}))
    [(_, _, value)] = [call for call in recorder.calls if call[0] == "refresh"]
    assert value.startswith("sha256:")


def test_the_reconciler_keeps_only_what_it_reads() -> None:
    obj = _obj("orders", "u1", annotations={"a": "b"}, status={"secretName": "s"})
    obj["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    obj["metadata"]["labels"] = {"team": "shop"}
    obj["metadata"]["generation"] = 3
    kept = learnt_part(obj)
    assert set(kept) == {"metadata", "spec", "status"}
    assert "managedFields" not in kept["metadata"]
    assert "labels" not in kept["metadata"]
    assert kept["metadata"]["generation"] == 3
    assert kept["metadata"]["annotations"] == {"a": "b"}
    assert kept["status"] == {"secretName": "s"}
