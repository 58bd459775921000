"""The Secret's shape, ownership rules and read-back for seeding."""

import base64
import copy
import json
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
import pytest
from pytest_httpserver import HTTPServer

from m2m_token_operator.api.constants import KEY_ID_ANNOTATION, JsonObject
from m2m_token_operator.api.secret_layout import token_request_owner
from m2m_token_operator.api.timefmt import format_time
from m2m_token_operator.kube.kube_api import KubeApi
from m2m_token_operator.reconcile.secret_output import (
    Owner,
    WriteOutcome,
    _differs,
    is_owned_by,
    merge_for_replace,
    owner_reference,
    render_secret,
    token_from_secret,
    write_secret,
)
from m2m_token_operator.tokens.model import AccessToken

NOW = datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC)
OWNER = Owner(namespace="shop", name="orders-api", uid="uid-1")
SCOPE = "api://prod.orders.orders-api/.default"
SEAL = "v2:5eal"  # what SealKey.seal would give
TOKEN = AccessToken(
    value="header.payload.signature",
    token_type="Bearer",
    issued_at=NOW,
    expires_at=NOW + timedelta(seconds=3599),
)


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_rendered_secret_follows_the_contract() -> None:
    secret = render_secret(
        owner=OWNER, secret_name="orders-api-token", scope=SCOPE, token=TOKEN, seal=SEAL
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
    assert meta["annotations"]["m2m.dev/seal"] == SEAL
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
    secret = render_secret(owner=OWNER, secret_name="s", scope=SCOPE, token=TOKEN, seal=SEAL)
    assert is_owned_by(secret, "uid-1")
    assert not is_owned_by(secret, "uid-2")
    secret["metadata"]["ownerReferences"][0]["controller"] = False
    assert not is_owned_by(secret, "uid-1")
    assert not is_owned_by({"metadata": {}}, "uid-1")


def test_drift_detection_and_merge_keep_foreign_labels() -> None:
    desired = render_secret(owner=OWNER, secret_name="s", scope=SCOPE, token=TOKEN, seal=SEAL)
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
    secret = render_secret(owner=OWNER, secret_name="s", scope=SCOPE, token=TOKEN, seal=SEAL)
    later = NOW + timedelta(minutes=5)
    seeded = token_from_secret(
        secret, owner_uid="uid-1", scope=SCOPE, now=later, seal_for=lambda _: SEAL
    )
    assert seeded is not None
    assert seeded.value == TOKEN.value
    assert format_time(seeded.expires_at) == "2026-11-29T09:59:59Z"
    assert seeded.issued_at == NOW
    # Not ours, another scope, or expired: nothing to reuse.
    assert token_from_secret(secret, owner_uid="uid-2", scope=SCOPE, now=NOW, seal_for=None) is None
    assert (
        token_from_secret(
            secret, owner_uid="uid-1", scope="api://x.y.z/.default", now=NOW, seal_for=None
        )
        is None
    )
    assert (
        token_from_secret(
            secret, owner_uid="uid-1", scope=SCOPE, now=NOW + timedelta(hours=2), seal_for=None
        )
        is None
    )
    broken = {**secret, "data": {"token": "!!!"}}
    assert token_from_secret(broken, owner_uid="uid-1", scope=SCOPE, now=NOW, seal_for=None) is None


def test_a_token_is_reused_only_when_its_seal_verifies() -> None:
    """Edited, planted, or sealed for something else: the seal does not match.

    The seal itself (SealKey.seal, keyed by the operator's own key) is tested in test_seal.
    """
    secret = render_secret(owner=OWNER, secret_name="s", scope=SCOPE, token=TOKEN, seal=SEAL)
    now = NOW + timedelta(minutes=5)

    def reread(
        secret: dict[str, Any], seal_for: Callable[[AccessToken], str] | None
    ) -> AccessToken | None:
        return token_from_secret(secret, owner_uid="uid-1", scope=SCOPE, now=now, seal_for=seal_for)

    def good_seal(token: AccessToken) -> str:
        return SEAL if token == TOKEN else "other"

    assert reread(secret, good_seal) == TOKEN
    assert reread(secret, lambda _: "another seal") is None
    # A tenant who may edit the Secret plants a token that lives until 2099.
    planted = copy.deepcopy(secret)
    planted["data"]["token"] = base64.b64encode(b"forged").decode()
    planted["data"]["expires-at"] = base64.b64encode(b"2099-01-01T00:00:00Z").decode()
    assert reread(planted, good_seal) is None
    # What the workload reads now, whoever wrote it.
    assert reread(planted, None) is not None
    # Written before seals existed: not reused.
    del secret["metadata"]["annotations"]["m2m.dev/seal"]
    assert reread(secret, good_seal) is None


def test_parse_time_takes_a_timestamp_without_an_offset_as_utc() -> None:
    """A hand-edited "2026-11-29T10:00:00" is UTC, whatever the process's time zone."""
    import os
    import time

    from m2m_token_operator.api.timefmt import parse_time

    saved = os.environ.get("TZ")
    os.environ["TZ"] = "EST5"  # a POSIX rule, no tz database needed: UTC-5
    time.tzset()
    try:
        expected = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
        assert parse_time("2026-11-29T10:00:00") == expected
        assert parse_time("2026-11-29T10:00:00").tzinfo == UTC
        assert parse_time("2026-11-29T10:00:00Z") == expected
        assert parse_time("2026-11-29T11:00:00+01:00") == expected
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


# --- write_secret against a real HTTP server standing in for the API server ------------

SECRETS_PATH = "/api/v1/namespaces/shop/secrets"


@pytest.fixture
def kube(httpserver: HTTPServer) -> Iterator[KubeApi]:
    configuration = kubernetes.client.Configuration()
    configuration.host = httpserver.url_for("").rstrip("/")
    configuration.retries = 0
    api = KubeApi(kubernetes.client.ApiClient(configuration))
    yield api
    api.close()


def _live(desired: JsonObject) -> JsonObject:
    """The Secret as the API server holds it: owned, with an older token and a version."""
    existing: JsonObject = json.loads(json.dumps(desired))
    existing["metadata"]["resourceVersion"] = "7"
    existing["data"]["token"] = "b2xk"  # "old"
    return existing


def _desired() -> JsonObject:
    return render_secret(
        owner=OWNER, secret_name="orders-api-token", scope=SCOPE, token=TOKEN, seal="s"
    )


async def test_replace_losing_a_race_is_raced_not_unchanged(
    httpserver: HTTPServer, kube: KubeApi
) -> None:
    """Defect 2 of issue 10: a 409 means our token is not in the Secret."""
    httpserver.expect_request(f"{SECRETS_PATH}/orders-api-token", method="PUT").respond_with_json(
        {"kind": "Status", "code": 409, "reason": "Conflict"}, status=409
    )
    desired = _desired()
    outcome = await write_secret(
        kube, desired=desired, owner_uid=OWNER.uid, existing=_live(desired)
    )
    assert outcome is WriteOutcome.RACED


async def test_replace_of_a_secret_deleted_meanwhile_creates_it_again(
    httpserver: HTTPServer, kube: KubeApi
) -> None:
    """Defect 6 of issue 10: a 404 on the replace is not SecretWriteFailed."""
    httpserver.expect_request(f"{SECRETS_PATH}/orders-api-token", method="PUT").respond_with_json(
        {"kind": "Status", "code": 404, "reason": "NotFound"}, status=404
    )
    desired = _desired()
    httpserver.expect_request(SECRETS_PATH, method="POST").respond_with_json(desired, status=201)
    outcome = await write_secret(
        kube, desired=desired, owner_uid=OWNER.uid, existing=_live(desired)
    )
    assert outcome is WriteOutcome.CREATED
    created = [request for request, _ in httpserver.log if request.method == "POST"]
    assert len(created) == 1
    assert json.loads(created[0].get_data())["data"] == desired["data"]


def test_only_a_controller_reference_to_a_token_request_makes_a_secret_ours() -> None:
    reference = owner_reference(OWNER)
    assert token_request_owner({"ownerReferences": [reference]}) == OWNER.uid
    assert token_request_owner({}) is None
    assert token_request_owner({"ownerReferences": [{**reference, "controller": False}]}) is None
    assert token_request_owner({"ownerReferences": [{**reference, "kind": "Job"}]}) is None
    assert (
        token_request_owner({"ownerReferences": [{**reference, "apiVersion": "evil.dev/v1"}]})
        is None
    )
    # Another version of our group is still ours (a CRD version upgrade).
    assert (
        token_request_owner({"ownerReferences": [{**reference, "apiVersion": "m2m.dev/v1"}]})
        == OWNER.uid
    )


def test_the_key_id_is_written_with_a_token_but_alone_is_no_reason_to_write() -> None:
    desired = render_secret(
        owner=OWNER, secret_name="orders-api", scope=SCOPE, token=TOKEN, seal=SEAL, key_id="v2:k"
    )
    assert desired["metadata"]["annotations"][KEY_ID_ANNOTATION] == "v2:k"
    # A Secret written by an older version (no key id) with the same token: left alone.
    older = copy.deepcopy(desired)
    del older["metadata"]["annotations"][KEY_ID_ANNOTATION]
    older["metadata"]["resourceVersion"] = "3"
    assert not _differs(older, desired)
    # With a new token it is written, key id included.
    older["data"]["token"] = "b2xk"
    assert _differs(older, desired)
    merged = merge_for_replace(older, desired)
    assert merged["metadata"]["annotations"][KEY_ID_ANNOTATION] == "v2:k"


async def test_a_write_tells_what_the_api_server_stored(
    httpserver: HTTPServer, kube: KubeApi
) -> None:
    desired = _desired()
    stored = {**desired, "metadata": {**desired["metadata"], "resourceVersion": "9"}}
    httpserver.expect_request(SECRETS_PATH, method="POST").respond_with_json(stored, status=201)
    seen: list[Mapping[str, Any]] = []
    outcome = await write_secret(
        kube, desired=desired, owner_uid=OWNER.uid, existing=None, written=seen.append
    )
    assert outcome is WriteOutcome.CREATED
    assert [s["metadata"]["resourceVersion"] for s in seen] == ["9"]
