"""The Secret watches' consumer: which events reach the reconciler, and how often.

The watches themselves are `LabelSelectedWatch` (tested against a real API
server in tests/e2e/test_watch.py); here the events are fed by hand, and time
is the loop's fake clock (looptime): `asyncio.sleep` advances it at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kubernetes
import pytest

from m2m_token_operator.app.main import namespace_patterns
from m2m_token_operator.kube.namespace_match import namespace_matcher
from m2m_token_operator.kube.reflector import ADDED, DELETED, MODIFIED
from m2m_token_operator.kube.secret_watches import (
    CREDENTIALS_SELECTOR,
    OWNED_SELECTOR,
    Debouncer,
    OwnedSecrets,
    SecretFeed,
    secret_watches,
    served_namespaces,
)


def secret(namespace: str, name: str, *, version: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name, "resourceVersion": version},
        "data": {"token": "dG9rZW4="},
        "type": "Opaque",
    }


def token_request_reference(uid: str = "uid-1") -> dict[str, Any]:
    return {
        "apiVersion": "m2m.dev/v1alpha1",
        "kind": "TokenRequest",
        "name": "orders-api",
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def ours(
    namespace: str,
    name: str,
    *,
    version: str = "1",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An owned Secret as the metadata-only watch shows it: a TokenRequest controls it."""
    metadata: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "resourceVersion": version,
        "labels": {"app.kubernetes.io/managed-by": "m2m-token-operator"},
        "ownerReferences": [token_request_reference()],
    }
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"kind": "PartialObjectMetadata", "metadata": metadata}


def full(secret: dict[str, Any], token: str = "dG9rZW4=") -> dict[str, Any]:
    """The same Secret as a read or a write returns it: with the operator's four keys."""
    data = {"token": token, "token-type": "QmVhcmVy", "expires-at": "eA==", "scope": "cw=="}
    return {**secret, "data": data}


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, bool]] = []  # (ns, name, version, deleted)
        self.loop_times: list[float] = []

    def __call__(self, obj: Mapping[str, Any], deleted: bool) -> None:
        metadata = obj["metadata"]
        self.calls.append(
            (metadata["namespace"], metadata["name"], metadata["resourceVersion"], deleted)
        )
        self.loop_times.append(asyncio.get_running_loop().time())


# Debounce of credentials changes


@pytest.mark.looptime
async def test_several_credentials_edits_in_a_second_cause_one_look() -> None:
    sink = Sink()
    feed = SecretFeed(sink=sink, serves=lambda _: True)
    started = asyncio.get_running_loop().time()
    for version in range(5):  # five edits, 0.2 s apart
        feed.credentials(MODIFIED, secret("team-a", "azure", version=str(version)))
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)
    assert sink.calls == [("team-a", "azure", "4", False)]  # one look, at the latest version
    assert sink.loop_times[0] - started == pytest.approx(1.8)  # quiet for 1 s after the last


@pytest.mark.looptime
async def test_an_endless_edit_loop_still_gets_a_look_every_two_seconds() -> None:
    sink = Sink()
    feed = SecretFeed(sink=sink, serves=lambda _: True)
    started = asyncio.get_running_loop().time()
    for version in range(60):  # an edit every 0.1 s for 6 s
        feed.credentials(MODIFIED, secret("team-a", "azure", version=str(version)))
        await asyncio.sleep(0.1)
    await asyncio.sleep(3)
    offsets = [round(at - started, 1) for at in sink.loop_times]
    assert offsets == [2.0, 4.0, 6.0]  # 60 edits: one look per 2 s, never none
    assert sink.calls[-1][2] == "59"  # the last look saw the last edit


@pytest.mark.looptime
async def test_separate_secrets_are_debounced_separately_and_deletion_is_kept() -> None:
    sink = Sink()
    feed = SecretFeed(sink=sink, serves=lambda _: True)
    feed.credentials(ADDED, secret("team-a", "azure"))
    feed.credentials(DELETED, secret("team-b", "azure"))
    await asyncio.sleep(1.1)
    assert sorted(sink.calls) == [("team-a", "azure", "1", False), ("team-b", "azure", "1", True)]


@pytest.mark.looptime
async def test_cancel_drops_pending_looks() -> None:
    fired: list[str] = []
    debouncer: Debouncer[str, str] = Debouncer(lambda key, value: fired.append(value))
    debouncer.push("k", "v")
    assert len(debouncer) == 1
    debouncer.cancel()
    await asyncio.sleep(5)
    assert fired == []


# Owned Secrets and namespaces


@pytest.mark.looptime
async def test_owned_secret_events_pass_at_once_with_their_metadata() -> None:
    received: list[tuple[Mapping[str, Any], bool]] = []
    feed = SecretFeed(sink=lambda obj, deleted: received.append((obj, deleted)), serves=bool)
    feed.owned(MODIFIED, ours("team-a", "api-token"))
    feed.owned(DELETED, {"metadata": {"namespace": "team-a", "name": "gone"}})
    assert [deleted for _, deleted in received] == [False, True]
    assert set(received[0][0]) == {"metadata"}  # the watch is metadata-only: no data
    assert received[0][0]["metadata"]["name"] == "api-token"


async def test_events_of_namespaces_not_served_are_dropped() -> None:
    sink = Sink()
    feed = SecretFeed(sink=sink, serves=namespace_matcher(["team-a-*"]))
    feed.owned(ADDED, secret("team-b-1", "x"))
    feed.owned(ADDED, secret("team-a-1", "x"))
    assert [call[0] for call in sink.calls] == ["team-a-1"]


def test_namespace_matcher_follows_kopf_globs_and_exclusions() -> None:
    matches = namespace_matcher(["team-*, !team-secret", "extra"])
    assert matches("team-a")
    assert matches("extra")
    assert not matches("team-secret")
    assert not matches("other")
    assert namespace_matcher([])("anything")
    assert namespace_matcher(["!kube-*"])("default")
    assert not namespace_matcher(["!kube-*"])("kube-system")


def test_served_namespaces_come_from_the_command_line() -> None:
    args = ["--standalone", "--namespace=team-a", "-n", "team-b", "--namespace", "x-*"]
    patterns = namespace_patterns(args)
    assert patterns == ["team-a", "team-b", "x-*"]
    assert served_namespaces({"M2M_SERVED_NAMESPACES": "\n".join(patterns)}) == patterns
    assert served_namespaces({}) == []
    assert namespace_patterns(["--all-namespaces"]) == []


def test_plain_names_get_a_watch_each_and_globs_one_cluster_wide() -> None:
    api = kubernetes.client.ApiClient(kubernetes.client.Configuration())
    feed = SecretFeed(sink=lambda obj, deleted: None, serves=bool)
    per_namespace = secret_watches(api, feed, namespaces=["team-a", "team-b"])
    assert [w.name for w in per_namespace] == [
        "owned-secrets/team-a",
        "credentials-secrets/team-a",
        "owned-secrets/team-b",
        "credentials-secrets/team-b",
    ]
    wide = secret_watches(api, feed, namespaces=["team-*"])
    assert [w.name for w in wide] == ["owned-secrets/all", "credentials-secrets/all"]
    assert {w._selector for w in wide} == {OWNED_SELECTOR, CREDENTIALS_SELECTOR}
    api.close()  # type: ignore[no-untyped-call]


# The owned-Secrets store: a look's read without an API call


def test_the_store_is_ready_once_every_owned_watch_has_listed() -> None:
    api = kubernetes.client.ApiClient(kubernetes.client.Configuration())
    store = OwnedSecrets()
    feed = SecretFeed(sink=lambda obj, deleted: None, serves=bool, store=store)
    assert not store.ready()  # no watch feeds it yet: every look reads from the API server
    watches = secret_watches(api, feed, namespaces=["team-a", "team-b"])
    owned = [w for w in watches if w.name.startswith("owned-")]
    assert len(owned) == 2
    owned[0].synced.set()
    assert not store.ready()  # team-b's Secrets are not all in yet
    owned[1].synced.set()
    assert store.ready()  # the credentials watches do not count: they feed no store
    late = asyncio.Event()
    store.track(late)  # remembered "ready" is asked again once another watch feeds it
    assert not store.ready()
    late.set()
    assert store.ready()
    api.close()  # type: ignore[no-untyped-call]


def test_the_store_keeps_the_latest_of_each_owned_secret_before_the_look_it_wakes() -> None:
    store = OwnedSecrets()
    seen_by_sink: list[dict[str, Any] | None] = []
    feed = SecretFeed(
        sink=lambda obj, _: seen_by_sink.append(store.get("team-a", obj["metadata"]["name"])),
        serves=namespace_matcher(["team-a"]),
        store=store,
    )
    first = ours("team-a", "api-token", version="1", annotations={"m2m.dev/seal": "v2:abc"})
    first["metadata"]["managedFields"] = [{"manager": "m2m-token-operator"}]
    feed.owned(ADDED, first)
    feed.owned(MODIFIED, ours("team-a", "api-token", version="2"))
    feed.owned(ADDED, ours("team-b", "not-served"))
    kept = store.get("team-a", "api-token")
    assert kept is not None
    assert kept["metadata"]["resourceVersion"] == "2"
    assert set(kept) == {"metadata"}
    assert seen_by_sink[0] is not None
    assert set(seen_by_sink[0]["metadata"]) == {
        "name", "namespace", "resourceVersion", "labels", "annotations", "ownerReferences"
    }  # fmt: skip
    assert [s["metadata"]["resourceVersion"] for s in seen_by_sink if s] == ["1", "2"]
    assert store.get("team-b", "not-served") is None
    feed.owned(DELETED, {"metadata": {"namespace": "team-a", "name": "api-token"}})
    assert store.get("team-a", "api-token") is None
    assert len(store) == 0


def test_the_store_keeps_only_secrets_a_token_request_controls() -> None:
    store = OwnedSecrets()
    labelled_only = ours("team-a", "forged")
    labelled_only["metadata"].pop("ownerReferences")
    other_kind = ours("team-a", "other-kind")
    other_kind["metadata"]["ownerReferences"][0]["kind"] = "Deployment"
    other_group = ours("team-a", "other-group")
    other_group["metadata"]["ownerReferences"][0]["apiVersion"] = "example.com/v1"
    not_controller = ours("team-a", "not-controller")
    not_controller["metadata"]["ownerReferences"][0]["controller"] = False
    for forged in (labelled_only, other_kind, other_group, not_controller):
        assert store.record(ADDED, forged) is False
    assert store.record(ADDED, ours("team-a", "api-token")) is True
    assert len(store) == 1
    assert store.get("team-a", "forged") is None
    # An owned Secret whose owner reference is removed is not ours any more.
    disowned = ours("team-a", "api-token", version="2")
    disowned["metadata"]["ownerReferences"] = []
    assert store.record(MODIFIED, disowned) is False
    assert store.get("team-a", "api-token") is None


def test_the_store_holds_no_data_but_what_a_look_read_or_wrote_at_that_version() -> None:
    store = OwnedSecrets()
    event = full(ours("team-a", "api-token", version="5"))  # a full event: data not kept
    store.record(ADDED, event)
    kept = store.get("team-a", "api-token")
    assert kept is not None
    assert "data" not in kept
    assert not store.data_seen("team-a", "api-token")
    # A look read (or wrote) version 5: its data is known at version 5.
    store.remember(full(ours("team-a", "api-token", version="5")))
    kept = store.get("team-a", "api-token")
    assert kept is not None
    assert kept["data"]["token"] == "dG9rZW4="
    assert store.data_at("team-a", "api-token", "5") == kept["data"]
    # Someone changed it (version 6): its data is not known, though the look saw it once.
    store.record(MODIFIED, ours("team-a", "api-token", version="6"))
    kept = store.get("team-a", "api-token")
    assert kept is not None
    assert "data" not in kept
    assert store.data_at("team-a", "api-token", "6") is None
    assert store.data_seen("team-a", "api-token")
    # Data not of the operator's shape (an added key, or a huge one) is never kept, but the
    # Secret still counts as seen: its data is read again rather than trusted.
    edited = full(ours("team-a", "api-token", version="6"))
    edited["data"]["extra"] = "eA=="
    store.remember(edited)
    assert store.data_at("team-a", "api-token", "6") is None
    assert store.data_seen("team-a", "api-token")
    store.remember(full(ours("team-a", "api-token", version="6"), token="A" * (1 << 20)))
    assert store.data_at("team-a", "api-token", "6") is None
    # Gone: nothing of it stays.
    store.record(DELETED, {"metadata": {"namespace": "team-a", "name": "api-token"}})
    assert not store.data_seen("team-a", "api-token")


def test_the_store_shares_the_data_strings_that_secrets_of_one_key_repeat() -> None:
    store = OwnedSecrets()
    for name in ("one", "two"):
        store.record(ADDED, ours("team-a", name))
        store.remember(full(ours("team-a", name), token="".join(["dG9r", "ZW4="])))
    one, two = store.get("team-a", "one"), store.get("team-a", "two")
    assert one is not None
    assert two is not None
    assert one["data"]["token"] is two["data"]["token"]


def test_the_store_finds_the_secrets_of_a_key_by_their_key_id() -> None:
    store = OwnedSecrets()
    store.record(ADDED, ours("team-a", "one", annotations={"m2m.dev/key-id": "v2:k1"}))
    store.record(ADDED, ours("team-b", "two", annotations={"m2m.dev/key-id": "v2:k1"}))
    store.record(ADDED, ours("team-b", "three", annotations={"m2m.dev/key-id": "v2:k2"}))
    store.record(ADDED, ours("team-b", "old"))  # written before key ids: no annotation
    assert [s["metadata"]["name"] for s in store.with_key_id("v2:k1")] == ["one", "two"]
    # A new token for another key moves the Secret; a deletion takes it out.
    store.record(MODIFIED, ours("team-b", "two", annotations={"m2m.dev/key-id": "v2:k2"}))
    assert [s["metadata"]["name"] for s in store.with_key_id("v2:k1")] == ["one"]
    store.record(DELETED, {"metadata": {"namespace": "team-a", "name": "one"}})
    assert store.with_key_id("v2:k1") == []
    assert [s["metadata"]["name"] for s in store.with_key_id("v2:k2")] == ["three", "two"]


def test_both_secret_watches_are_metadata_only() -> None:
    api = kubernetes.client.ApiClient(kubernetes.client.Configuration())
    feed = SecretFeed(sink=lambda obj, deleted: None, serves=bool)
    watches = secret_watches(api, feed, namespaces=["team-a"])
    assert [w.metadata_only for w in watches] == [True, True]
    api.close()  # type: ignore[no-untyped-call]


def test_a_change_no_look_has_seen_is_read_not_inferred() -> None:
    store = OwnedSecrets()
    store.record(ADDED, ours("team-a", "api-token", version="5"))
    assert not store.data_seen("team-a", "api-token")  # after a start: may be inferred
    store.changed("team-a", "api-token", "6")  # a watch event of a version nobody read
    assert store.data_seen("team-a", "api-token")
    assert store.data_at("team-a", "api-token", "6") is None
    # Our own write's event may come before the write returns: what it wrote still counts.
    store.remember(full(ours("team-a", "api-token", version="6")))
    store.changed("team-a", "api-token", "6")
    assert store.data_at("team-a", "api-token", "6") is not None


def test_a_version_a_look_read_or_wrote_is_seen_and_no_other() -> None:
    store = OwnedSecrets()
    store.record(ADDED, ours("team-a", "api-token", version="5"))
    assert not store.seen_at("team-a", "api-token", "5")  # the watch's news alone
    store.remember(full(ours("team-a", "api-token", version="6")))  # a look wrote it
    assert store.seen_at("team-a", "api-token", "6")
    assert not store.seen_at("team-a", "api-token", "7")
    edited = full(ours("team-a", "api-token", version="7"))
    edited["data"]["extra"] = "eA=="
    store.remember(edited)  # a look read it, of another shape: seen, its data not kept
    assert store.seen_at("team-a", "api-token", "7")
    assert store.data_at("team-a", "api-token", "7") is None


def test_managed_fields_tell_whether_anyone_else_changed_the_data() -> None:
    def with_managers(*entries: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        secret = ours("team-a", "api-token")
        secret["metadata"]["managedFields"] = [
            {"manager": manager, "operation": "Update", "fieldsV1": fields}
            for manager, fields in entries
        ]
        return secret

    data: dict[str, Any] = {"f:data": {"f:token": {}}}
    labels: dict[str, Any] = {"f:metadata": {"f:labels": {"f:team": {}}}}
    store = OwnedSecrets()
    store.record(ADDED, with_managers(("m2m-token-operator", data), ("kubectl-label", labels)))
    assert not store.data_edited("team-a", "api-token")  # a label of someone else's: no
    store.record(MODIFIED, with_managers(("m2m-token-operator", data), ("kubectl-edit", data)))
    assert store.data_edited("team-a", "api-token")
    # The operator wrote it back: the API server gave the field back to it alone.
    store.record(MODIFIED, with_managers(("m2m-token-operator", data)))
    assert not store.data_edited("team-a", "api-token")
    # Written by a version that did not name its field manager: not proven ours.
    store.record(MODIFIED, with_managers(("OpenAPI-Generator", data)))
    assert store.data_edited("team-a", "api-token")
    kept = store.get("team-a", "api-token")
    assert kept is not None
    assert "managedFields" not in kept["metadata"]  # decided on arrival, not kept
