"""The operator's main path, end to end through Kopf on the real API server:
TokenRequest → token → Secret → status.

One test per behaviour of the operator issue; the failure paths live in
test_failures.py, the API server's own faults (via the proxy) in test_api_faults.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from .harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    CLUSTER_NAME,
    SECRETS,
    Kube,
    OperatorFactory,
    OperatorRun,
    TokenEndpoint,
    wait_for,
)

NS = "shop"
NAME = "orders-api"
WRITES = ("POST", "PUT", "PATCH", "DELETE")
SCOPE = f"api://{CLUSTER_NAME}.orders.orders-api/.default"
TARGET = {"target": {"application": "orders-api", "namespace": "orders"}}


def ready(kube: Kube, name: str, namespace: str = NS) -> bool:
    condition = kube.condition(namespace, name, "Ready")
    return bool(condition and condition["status"] == "True")


async def wait_ready(kube: Kube, name: str, namespace: str = NS) -> dict[str, Any]:
    await wait_for(lambda: ready(kube, name, namespace), message=f"{namespace}/{name} Ready")
    status = kube.read_status(namespace, name)
    assert status is not None
    return status


async def test_create_writes_the_secret_exactly_as_the_contract_says(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    created = kube.create_token_request(NS, "orders-api", TARGET)
    status = await wait_ready(kube, "orders-api")

    secret = kube.read_secret_object(NS, "orders-api")
    assert secret is not None
    meta = secret["metadata"]
    assert secret["type"] == "Opaque"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "m2m-token-operator"
    assert meta["labels"]["m2m.dev/token-request"] == "orders-api"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "m2m.dev/v1alpha1",
            "kind": "TokenRequest",
            "name": "orders-api",
            "uid": created["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    data = kube.read_secret(NS, "orders-api")
    assert data is not None
    assert set(data) == {"token", "token-type", "expires-at", "scope"}
    assert data["token"] == token_endpoint.tokens[0]
    assert data["token-type"] == "Bearer"
    assert data["scope"] == SCOPE
    assert meta["annotations"]["m2m.dev/expires-at"] == data["expires-at"]

    # The wire: exactly the four form fields of the client-credentials grant.
    assert token_endpoint.count == 1
    assert token_endpoint.calls[0].form == {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "grant_type": "client_credentials",
        "scope": SCOPE,
    }

    assert status["scope"] == SCOPE
    assert status["secretName"] == "orders-api"
    assert status["expiresAt"] == data["expires-at"]
    assert status["refreshAt"] < status["expiresAt"]
    assert status["observedGeneration"] == 1
    assert status["failedAttempts"] == 0
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["reason"] == "TokenIssued"
    assert conditions["Degraded"]["status"] == "False"
    assert conditions["Degraded"]["reason"] == "RefreshSucceeded"
    events = await wait_for(lambda: kube.events_for(NS, "orders-api"), message="an event")
    assert [(e["type"], e["reason"]) for e in events] == [("Normal", "TokenIssued")]


async def test_token_requests_sharing_identity_and_scope_share_one_call(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    # Two namespaces and a third TokenRequest with an explicit scope: one identity, one scope.
    kube.create_token_request("team-a", "orders", TARGET)
    kube.create_token_request("team-b", "orders", TARGET)
    kube.create_token_request("team-b", "orders-again", {"scope": SCOPE, "secretName": "again"})
    for namespace, name in (("team-a", "orders"), ("team-b", "orders"), ("team-b", "orders-again")):
        await wait_ready(kube, name, namespace)
    tokens = {
        kube.read_secret("team-a", "orders")["token"],  # type: ignore[index]
        kube.read_secret("team-b", "orders")["token"],  # type: ignore[index]
        kube.read_secret("team-b", "again")["token"],  # type: ignore[index]
    }
    assert token_endpoint.count == 1
    assert tokens == {token_endpoint.tokens[0]}


async def test_short_lived_token_is_replaced_before_it_expires(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    token_endpoint.expires_in = 6  # refresh due about 4 s after issue
    kube.create_token_request(NS, "orders-api", TARGET)
    await wait_ready(kube, "orders-api")
    first = kube.read_secret(NS, "orders-api")
    assert first is not None

    def refreshed() -> dict[str, str] | None:
        secret = kube.read_secret(NS, "orders-api")
        return secret if secret is not None and secret["token"] != first["token"] else None

    second = await wait_for(refreshed, timeout=10, message="a refreshed token")
    assert second["expires-at"] > first["expires-at"]
    # Replaced before the first one expired: the refresh happened while it was still valid.
    refresh_call = token_endpoint.calls[1]
    issue_call = token_endpoint.calls[0]
    lifetime = refresh_call.received_at - issue_call.received_at  # seconds
    assert 2.0 <= lifetime < 6.0

    def two_events() -> list[dict[str, Any]] | None:
        events = kube.events_for(NS, "orders-api")
        return events if len(events) >= 2 else None

    events = await wait_for(two_events, message="two events")
    assert [e["reason"] for e in events][:2] == ["TokenIssued", "TokenRefreshed"]


async def test_foreign_secret_is_never_touched_and_the_conflict_is_reported(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    foreign = kube.create_secret(NS, "orders-api", {"password": "someone-elses"})
    kube.create_token_request(NS, "orders-api", TARGET)

    async def conflict() -> bool:
        condition = kube.condition(NS, "orders-api", "Ready")
        return bool(condition and condition["reason"] == "SecretConflict")

    await wait_for(conflict, message="SecretConflict")
    assert kube.condition(NS, "orders-api", "Ready")["status"] == "False"  # type: ignore[index]
    # The first look goes by the owned-Secrets watch, which never shows someone else's
    # Secret: it tries a create, which the API server refuses (409), reads the Secret and
    # reports the conflict. That is the only write it ever sent, and it changed nothing.
    # The look that reported the conflict had sent all its writes before it wrote the status.
    writes = [r for r in kube.requests(path=r"/secrets") if r.method in WRITES]
    assert [(r.method, r.status) for r in writes] == [("POST", 409)]
    versions = kube.versions(SECRETS, NS, "orders-api")
    assert len(versions) == 1  # created by the test, never written by the operator
    assert kube.read_secret(NS, "orders-api") == {"password": "someone-elses"}
    # The token for that create was fetched (at most once per identity and scope, and kept
    # in the cache for the next look), never written anywhere.
    assert token_endpoint.count == 1
    current = kube.read_secret_object(NS, "orders-api")
    assert current is not None
    assert current["metadata"]["uid"] == foreign["metadata"]["uid"]

    # The name becomes free: the operator recovers without anybody touching the TokenRequest.
    kube.delete_secret(NS, "orders-api")
    await wait_ready(kube, "orders-api")
    assert kube.read_secret(NS, "orders-api")["token"] == token_endpoint.tokens[-1]  # type: ignore[index]


async def test_deleted_secret_is_recreated_and_edited_secret_restored(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    kube.create_token_request(NS, "orders-api", TARGET)
    await wait_ready(kube, "orders-api")
    original = kube.read_secret(NS, "orders-api")
    assert original is not None

    kube.delete_secret(NS, "orders-api")
    restored = await wait_for(lambda: kube.read_secret(NS, "orders-api"), message="recreated")
    assert restored == original

    kube.patch_secret(NS, "orders-api", {"stringData": {"token": "tampered", "extra": "x"}})
    await wait_for(
        lambda: kube.read_secret(NS, "orders-api") == original, message="restored after edit"
    )
    assert token_endpoint.count == 1  # repairs reuse the cached token
    await wait_for(
        lambda: (
            [e["reason"] for e in kube.events_for(NS, "orders-api")].count("SecretRestored") == 2
        ),
        message="two SecretRestored events",
    )


async def test_owned_secret_that_lost_its_label_gets_it_back(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    """Without its label the Secret leaves the owned-Secrets watch, which then shows no
    Secret of that name: the look's create is refused (409), the read that follows finds
    the Secret still ours, and the replace puts the label (and the token) back."""
    kube.create_token_request(NS, "orders-api", TARGET)
    await wait_ready(kube, "orders-api")
    original = kube.read_secret_object(NS, "orders-api")
    assert original is not None
    before = max((r.index for r in kube.requests()), default=0)

    kube.patch_secret(
        NS, "orders-api", {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}}
    )

    def labelled_again() -> bool:
        current = kube.read_secret_object(NS, "orders-api")
        labels = (current or {}).get("metadata", {}).get("labels") or {}
        return labels.get("app.kubernetes.io/managed-by") == "m2m-token-operator"

    await wait_for(labelled_again, message="the label put back")
    current = kube.read_secret_object(NS, "orders-api")
    assert current is not None
    assert current["metadata"]["uid"] == original["metadata"]["uid"]  # repaired, not replaced
    assert current["data"] == original["data"]
    assert token_endpoint.count == 1  # the cached token
    writes = [
        (r.method, r.status)
        for r in kube.requests(path=r"/secrets")
        if r.index > before and r.method in WRITES
    ]
    assert writes[:2] == [("POST", 409), ("PUT", 200)]


async def test_restart_with_a_valid_token_costs_no_call_and_no_write(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    first = operator_factory.start()
    kube.create_token_request(NS, "orders-api", TARGET)
    await wait_ready(kube, "orders-api")
    await wait_for(lambda: "looked at: Ready=" in first.all_text, message="the first look done")
    first.stop()
    secret_versions = len(kube.versions(SECRETS, NS, "orders-api"))
    status_before = kube.read_status(NS, "orders-api")
    status_writes = kube.requests("PATCH", r"/tokenrequests/orders-api/status$")
    assert len(status_writes) == 1  # the first run's one status write

    restarted = time.monotonic()
    run = operator_factory.start()
    # The positive signal that the restart looked at it: the line a look logs once it has
    # ended (Secret read, decision, and any write) for an object it newly learnt.
    await wait_for(
        lambda: "looked at: Ready=" in run.all_text,
        message="the look after the restart done",
    )
    run.stop()
    assert token_endpoint.count == 1
    assert len(kube.versions(SECRETS, NS, "orders-api")) == secret_versions
    assert kube.read_status(NS, "orders-api") == status_before
    after = kube.proxy.requests(path=r"/secrets|/status$", since=restarted)
    assert [str(r) for r in after if r.method in WRITES] == []


async def test_spec_change_takes_effect_at_once(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    kube.create_token_request(NS, "orders-api", TARGET)
    await wait_ready(kube, "orders-api")

    # A new target: a new scope, a new token, at once.
    kube.patch_token_request(
        NS, "orders-api", {"spec": {"target": {"application": "payments", "namespace": "pay"}}}
    )
    new_scope = f"api://{CLUSTER_NAME}.pay.payments/.default"
    await wait_for(
        lambda: (kube.read_secret(NS, "orders-api") or {}).get("scope") == new_scope,
        message="token for the new scope",
    )
    assert token_endpoint.calls[-1].form["scope"] == new_scope
    # The Secret is written before the status: wait for the status of generation 2.
    await wait_for(
        lambda: (kube.read_status(NS, "orders-api") or {}).get("observedGeneration") == 2,
        message="generation 2 observed",
    )
    status = await wait_ready(kube, "orders-api")
    assert status["observedGeneration"] == 2
    assert status["scope"] == new_scope

    # A new secretName: the new Secret is written, the old owned one deleted.
    kube.patch_token_request(NS, "orders-api", {"spec": {"secretName": "payments-token"}})
    await wait_for(lambda: kube.read_secret(NS, "payments-token"), message="new Secret")
    await wait_for(lambda: kube.read_secret(NS, "orders-api") is None, message="old Secret gone")
    # Ready is still True from generation 2: wait for the status of generation 3.
    await wait_for(
        lambda: (kube.read_status(NS, "orders-api") or {}).get("observedGeneration") == 3,
        message="generation 3 observed",
    )
    status = await wait_ready(kube, "orders-api")
    assert status["secretName"] == "payments-token"

    # Only refreshBefore changes: same token, no call (it can only move the refresh earlier).
    calls = token_endpoint.count
    kube.patch_token_request(NS, "orders-api", {"spec": {"refreshBefore": "10m"}})
    await wait_for(
        lambda: (kube.read_status(NS, "orders-api") or {}).get("observedGeneration") == 4,
        message="refreshBefore observed",
    )
    assert token_endpoint.count == calls


@pytest.mark.usefixtures("garbage_collector")
async def test_deleting_the_token_request_needs_no_operator(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    run = operator_factory.start()
    created = kube.create_token_request(NS, "orders-api", TARGET)
    await wait_ready(kube, "orders-api")
    stored = kube.read_token_request(NS, "orders-api")
    assert stored is not None
    assert not stored["metadata"].get("finalizers")  # nothing only the operator could remove
    run.stop()

    kube.delete_token_request(NS, "orders-api")
    assert kube.read_token_request(NS, "orders-api") is None
    # The owner reference lets the garbage collector take the Secret.
    await wait_for(
        lambda: kube.read_secret(NS, "orders-api") is None, timeout=30, message="Secret collected"
    )
    deleted = kube.versions(SECRETS, NS, "orders-api")
    assert deleted[-1] is None
    last = deleted[-2]
    assert last is not None
    assert last["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]


@pytest.mark.usefixtures("garbage_collector")
async def test_token_request_recreated_under_the_same_name_gets_its_own_secret(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    old = kube.create_token_request(NS, NAME, TARGET)
    await wait_ready(kube, NAME)
    kube.delete_token_request(NS, NAME)
    new = kube.create_token_request(NS, NAME, TARGET)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]

    def owned_by_the_new_one() -> dict[str, Any] | None:
        secret = kube.read_secret_object(NS, NAME)
        owners = (secret or {}).get("metadata", {}).get("ownerReferences") or []
        uids = [o["uid"] for o in owners]
        return secret if uids == [new["metadata"]["uid"]] else None

    # The garbage collector takes the old Secret (its owner is gone); the operator writes
    # one for the new TokenRequest, which the collector then leaves alone.
    secret = await wait_for(owned_by_the_new_one, timeout=30, message="the new owner's Secret")
    status = await wait_ready(kube, NAME)
    assert status["observedGeneration"] == 1
    assert status["secretName"] == NAME
    assert (kube.read_secret(NS, NAME) or {}).get("token") in token_endpoint.tokens
    assert secret["metadata"]["labels"]["m2m.dev/token-request"] == NAME
    # The old TokenRequest's Secret was taken by the collector, not adopted.
    history = [v for v in kube.versions(SECRETS, NS, NAME) if v is not None]
    owners = [v["metadata"]["ownerReferences"][0]["uid"] for v in history]
    assert owners[0] == old["metadata"]["uid"]
    assert owners[-1] == new["metadata"]["uid"]


async def test_no_secret_or_token_in_logs_status_or_events(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    run = operator_factory.start(extra_args=("--verbose",))
    token_endpoint.expires_in = 6
    kube.create_token_request(NS, "orders-api", TARGET)
    await wait_ready(kube, "orders-api")
    await wait_for(lambda: token_endpoint.count >= 2, timeout=10, message="one refresh")
    run.stop()
    secrets = (CLIENT_SECRET, *token_endpoint.tokens)
    operator_factory.assert_never_logged(*secrets)
    status_text = str(kube.read_status(NS, "orders-api"))
    events_text = str(kube.events_for(NS, "orders-api"))
    for value in secrets:
        assert value not in status_text
        assert value not in events_text
