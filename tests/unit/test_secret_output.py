"""The Secret's shape, ownership rules and read-back for seeding."""

import base64
from datetime import UTC, datetime, timedelta

from m2m_token_operator.client import AccessToken
from m2m_token_operator.secret_output import (
    Owner,
    _differs,
    format_time,
    is_owned_by,
    merge_for_replace,
    render_secret,
    token_from_secret,
)

NOW = datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC)
OWNER = Owner(namespace="shop", name="orders-api", uid="uid-1")
SCOPE = "api://prod.orders.orders-api/.default"
ISSUED_TO = "3f2a"  # an identity digest
TOKEN = AccessToken(
    value="header.payload.signature",
    token_type="Bearer",
    issued_at=NOW,
    expires_at=NOW + timedelta(seconds=3599),
)


def decoded(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_rendered_secret_follows_the_contract() -> None:
    secret = render_secret(
        owner=OWNER, secret_name="orders-api-token", scope=SCOPE, token=TOKEN, issued_to=ISSUED_TO
    )
    assert secret["type"] == "Opaque"
    meta = secret["metadata"]
    assert meta["name"] == "orders-api-token"
    assert meta["namespace"] == "shop"
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "m2m-token-operator",
        "m2m.dev/token-request": "orders-api",
    }
    assert meta["annotations"]["m2m.dev/expires-at"] == "2026-11-29T09:59:59Z"
    assert meta["annotations"]["m2m.dev/issued-to"] == ISSUED_TO
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "m2m.dev/v1alpha1",
            "kind": "TokenRequest",
            "name": "orders-api",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert decoded(secret) == {
        "token": "header.payload.signature",
        "token-type": "Bearer",
        "expires-at": "2026-11-29T09:59:59Z",
        "scope": SCOPE,
    }


def test_ownership_needs_controller_reference_with_our_uid() -> None:
    secret = render_secret(
        owner=OWNER, secret_name="s", scope=SCOPE, token=TOKEN, issued_to=ISSUED_TO
    )
    assert is_owned_by(secret, "uid-1")
    assert not is_owned_by(secret, "uid-2")
    secret["metadata"]["ownerReferences"][0]["controller"] = False
    assert not is_owned_by(secret, "uid-1")
    assert not is_owned_by({"metadata": {}}, "uid-1")


def test_drift_detection_and_merge_keep_foreign_labels() -> None:
    desired = render_secret(
        owner=OWNER, secret_name="s", scope=SCOPE, token=TOKEN, issued_to=ISSUED_TO
    )
    labels = {**desired["metadata"]["labels"], "team": "a"}
    live = {
        **desired,
        "metadata": {**desired["metadata"], "resourceVersion": "7", "labels": labels},
    }
    assert not _differs(live, desired)
    edited = {**live, "data": {**live["data"], "token": base64.b64encode(b"x").decode()}}
    assert _differs(edited, desired)
    extra = {**live, "data": {**live["data"], "extra": "eA=="}}
    assert _differs(extra, desired)
    merged = merge_for_replace(edited, desired)
    assert merged["metadata"]["labels"]["team"] == "a"
    assert merged["metadata"]["resourceVersion"] == "7"
    assert merged["data"] == desired["data"]


def test_token_read_back_from_an_owned_secret() -> None:
    secret = render_secret(
        owner=OWNER, secret_name="s", scope=SCOPE, token=TOKEN, issued_to=ISSUED_TO
    )
    later = NOW + timedelta(minutes=5)
    seeded = token_from_secret(
        secret, owner_uid="uid-1", scope=SCOPE, now=later, issued_to=ISSUED_TO
    )
    assert seeded is not None
    assert seeded.value == TOKEN.value
    assert format_time(seeded.expires_at) == "2026-11-29T09:59:59Z"
    assert seeded.issued_at == NOW
    # Not ours, another scope, or expired: nothing to reuse.
    assert (
        token_from_secret(secret, owner_uid="uid-2", scope=SCOPE, now=NOW, issued_to=None) is None
    )
    assert (
        token_from_secret(
            secret, owner_uid="uid-1", scope="api://x.y.z/.default", now=NOW, issued_to=None
        )
        is None
    )
    assert (
        token_from_secret(
            secret, owner_uid="uid-1", scope=SCOPE, now=NOW + timedelta(hours=2), issued_to=None
        )
        is None
    )
    broken = {**secret, "data": {"token": "!!!"}}
    assert (
        token_from_secret(broken, owner_uid="uid-1", scope=SCOPE, now=NOW, issued_to=None) is None
    )


def test_a_token_issued_to_another_identity_is_not_reused() -> None:
    """Credentials changed while the operator was down: the token in the Secret is not theirs."""
    secret = render_secret(
        owner=OWNER, secret_name="s", scope=SCOPE, token=TOKEN, issued_to=ISSUED_TO
    )
    now = NOW + timedelta(minutes=5)
    elsewhere = token_from_secret(secret, owner_uid="uid-1", scope=SCOPE, now=now, issued_to="9c0b")
    assert elsewhere is None
    # What the workload reads now, whoever it was issued to.
    assert token_from_secret(secret, owner_uid="uid-1", scope=SCOPE, now=now, issued_to=None)
    assert token_from_secret(secret, owner_uid="uid-1", scope=SCOPE, now=now, issued_to=ISSUED_TO)
    # Written before the annotation existed: another identity's, as far as anyone can tell.
    del secret["metadata"]["annotations"]["m2m.dev/issued-to"]
    legacy = token_from_secret(secret, owner_uid="uid-1", scope=SCOPE, now=now, issued_to=ISSUED_TO)
    assert legacy is None
