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

from m2m_token_operator.__main__ import namespace_patterns
from m2m_token_operator.watch import ADDED, DELETED, MODIFIED
from m2m_token_operator.watches import (
    CREDENTIALS_SELECTOR,
    OWNED_SELECTOR,
    Debouncer,
    OwnedSecrets,
    SecretFeed,
    namespace_matcher,
    secret_watches,
    served_namespaces,
)


def secret(namespace: str, name: str, *, version: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name, "resourceVersion": version},
        "data": {"token": "dG9rZW4="},
        "type": "Opaque",
    }


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
async def test_owned_secret_events_pass_at_once_with_only_metadata_and_data() -> None:
    received: list[tuple[Mapping[str, Any], bool]] = []
    feed = SecretFeed(sink=lambda obj, deleted: received.append((obj, deleted)), serves=bool)
    feed.owned(MODIFIED, secret("team-a", "api-token"))
    feed.owned(DELETED, {"metadata": {"namespace": "team-a", "name": "gone"}})
    assert [deleted for _, deleted in received] == [False, True]
    assert set(received[0][0]) == {"metadata", "data"}
    assert received[1][0]["data"] == {}


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
    api.close()  # type: ignore[no-untyped-call]


def test_the_store_keeps_the_latest_of_each_owned_secret_before_the_look_it_wakes() -> None:
    store = OwnedSecrets()
    seen_by_sink: list[dict[str, Any] | None] = []
    feed = SecretFeed(
        sink=lambda obj, _: seen_by_sink.append(store.get("team-a", obj["metadata"]["name"])),
        serves=namespace_matcher(["team-a"]),
        store=store,
    )
    first = secret("team-a", "api-token", version="1")
    first["metadata"]["managedFields"] = [{"manager": "m2m-token-operator"}]
    feed.owned(ADDED, first)
    feed.owned(MODIFIED, secret("team-a", "api-token", version="2"))
    feed.owned(ADDED, secret("team-b", "not-served"))
    kept = store.get("team-a", "api-token")
    assert kept is not None
    assert kept["metadata"]["resourceVersion"] == "2"
    assert set(kept) == {"metadata", "data", "type"}
    assert seen_by_sink[0] is not None
    assert set(seen_by_sink[0]["metadata"]) == {"name", "namespace", "resourceVersion"}
    assert [s["metadata"]["resourceVersion"] for s in seen_by_sink if s] == ["1", "2"]
    assert store.get("team-b", "not-served") is None
    # Secrets of one identity and scope hold the same token: one string in memory.
    same_token = secret("team-a", "other-token", version="3")
    same_token["data"]["token"] = "".join(["dG9r", "ZW4="])  # equal, not the same object
    assert same_token["data"]["token"] is not kept["data"]["token"]
    feed.owned(ADDED, same_token)
    other = store.get("team-a", "other-token")
    assert other is not None
    assert other["data"]["token"] is kept["data"]["token"]
    feed.owned(DELETED, {"metadata": {"namespace": "team-a", "name": "other-token"}})
    feed.owned(DELETED, {"metadata": {"namespace": "team-a", "name": "api-token"}})
    assert store.get("team-a", "api-token") is None
    assert len(store) == 0
