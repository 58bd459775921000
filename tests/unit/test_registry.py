"""The registry's bookkeeping: uid replacement, index upkeep, the unused-key callback."""

from __future__ import annotations

from typing import Any

from m2m_token_operator.reconcile.registry import Registry
from m2m_token_operator.tokens.cache import CacheKey

KEY = CacheKey("https://login.example/token", "client-1", "api://x/.default", "")


def body(uid: str, *, secret: str = "s1", credentials: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"scope": "api://x/.default", "secretName": secret}
    if credentials is not None:
        spec["credentials"] = {"secretRef": {"name": credentials}}
    return {"metadata": {"namespace": "shop", "name": "tr", "uid": uid}, "spec": spec}


def make() -> tuple[Registry, list[CacheKey]]:
    unused: list[CacheKey] = []
    return Registry(default_cluster="c", on_key_unused=unused.append), unused


def test_a_new_uid_under_the_same_name_replaces_and_drops_the_old_key() -> None:
    registry, unused = make()
    first, replaced = registry.learn(body("uid-1"))
    assert not replaced
    registry.use_key(first, KEY)
    second, replaced = registry.learn(body("uid-2"))
    assert replaced
    assert second.key is None
    assert second.lock is first.lock  # looks at one name stay one at a time
    assert unused == [KEY]
    assert registry.sharing_key(KEY) == set()


def test_an_update_keeps_the_key_and_moves_the_secret_indexes() -> None:
    registry, unused = make()
    first, _ = registry.learn(body("uid-1", secret="s1", credentials="c1"))
    registry.use_key(first, KEY)
    second, replaced = registry.learn(body("uid-1", secret="s2", credentials="c2"))
    assert not replaced
    assert second.key == KEY
    assert registry.sharing_key(KEY) == {("shop", "tr")}
    assert unused == []
    assert not registry.is_interesting_secret("shop", "s1")
    assert not registry.is_interesting_secret("shop", "c1")
    assert registry.naming_secret(("shop", "s2")) == {("shop", "tr")}
    assert registry.reading_credentials(("shop", "c2")) == {("shop", "tr")}


def test_forget_only_the_uid_asked_for() -> None:
    registry, unused = make()
    subscription, _ = registry.learn(body("uid-2"))
    registry.use_key(subscription, KEY)
    assert registry.forget("shop", "tr", "uid-1") is None  # a late DELETED of the old object
    assert registry.get(("shop", "tr")) is subscription
    assert registry.forget("shop", "tr", "uid-2") is subscription
    assert len(registry) == 0
    assert unused == [KEY]
    assert not registry.is_interesting_secret("shop", "s1")


def test_a_deletion_timestamp_is_learnt() -> None:
    registry, _ = make()
    deleting = body("uid-1")
    deleting["metadata"]["deletionTimestamp"] = "2026-11-29T09:00:00Z"
    subscription, _ = registry.learn(deleting)
    assert subscription.deleting
