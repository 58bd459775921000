"""The restart seal: keyed by the operator's own key, bound to everything the token is for."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from m2m_token_operator.api.constants import JsonObject
from m2m_token_operator.kube.kube_api import Conflict, KubeApi
from m2m_token_operator.reconcile.seal import (
    KEY_BYTES,
    SealKey,
    SealKeyError,
    key_from_secret,
    load_or_create,
    new_key_secret,
)
from m2m_token_operator.reconcile.secret_output import Owner, render_secret, token_from_secret
from m2m_token_operator.tokens.cache import CacheKey
from m2m_token_operator.tokens.credentials import ClientCredentials, secret_credentials
from m2m_token_operator.tokens.model import AccessToken

NOW = datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC)
SCOPE = "api://prod.orders.orders-api/.default"
ENDPOINT = "https://login.example/t/oauth2/v2.0/token"
CLIENT_SECRET = "s3cr3t-value-of-the-client"
KEY = SealKey(b"k" * KEY_BYTES)
CREDENTIALS = secret_credentials(
    token_endpoint=ENDPOINT,
    client_id="client-1",
    client_secret=CLIENT_SECRET,
    source="operator identity",
)
CACHE_KEY = CacheKey.for_credentials(CREDENTIALS, SCOPE)
TOKEN = AccessToken(
    value="header.payload.signature",
    token_type="Bearer",
    issued_at=NOW,
    expires_at=NOW + timedelta(seconds=3599),
)


def _with(**changes: Any) -> tuple[CacheKey, ClientCredentials, AccessToken]:
    """The seal's inputs with one thing changed."""
    key_names = {"token_endpoint", "client_id", "scope"}
    secret = changes.pop("client_secret", CLIENT_SECRET)
    token = dataclasses.replace(TOKEN, **{k: v for k, v in changes.items() if k not in key_names})
    credentials = secret_credentials(
        token_endpoint=changes.get("token_endpoint", ENDPOINT),
        client_id=changes.get("client_id", "client-1"),
        client_secret=secret,
        source="operator identity",
    )
    key = CacheKey.for_credentials(credentials, changes.get("scope", SCOPE))
    return key, credentials, token


def test_the_same_inputs_give_the_same_versioned_seal() -> None:
    seal = KEY.seal(CACHE_KEY, CREDENTIALS, TOKEN)
    assert seal.startswith("v2:")
    assert len(seal) == len("v2:") + 64
    # Another process with the same key (a restart, the other replica) computes it again.
    assert SealKey(b"k" * KEY_BYTES).seal(CACHE_KEY, CREDENTIALS, TOKEN) == seal


@pytest.mark.parametrize(
    "change",
    [
        {"token_endpoint": "https://login.example/other/oauth2/v2.0/token"},
        {"client_id": "client-2"},
        {"scope": "api://prod.orders.payments/.default"},
        {"client_secret": "rotated-while-the-operator-was-down"},
        {"value": "header.payload.other-signature"},
        {"token_type": "pop"},
        {"issued_at": NOW - timedelta(seconds=1)},
        {"expires_at": datetime(2099, 1, 1, tzinfo=UTC)},
    ],
)
def test_the_seal_binds_every_input(change: dict[str, Any]) -> None:
    key, credentials, token = _with(**change)
    assert KEY.seal(key, credentials, token) != KEY.seal(CACHE_KEY, CREDENTIALS, TOKEN)


def test_another_key_gives_another_seal() -> None:
    other = SealKey(b"o" * KEY_BYTES)
    assert other.seal(CACHE_KEY, CREDENTIALS, TOKEN) != KEY.seal(CACHE_KEY, CREDENTIALS, TOKEN)


def test_the_client_secret_is_not_the_key() -> None:
    """Whoever knows (or guesses) the client secret cannot compute or check a seal offline."""
    seal = KEY.seal(CACHE_KEY, CREDENTIALS, TOKEN)
    message = "\n".join(
        (
            ENDPOINT,
            "client-1",
            "",
            SCOPE,
            TOKEN.value,
            TOKEN.token_type,
            str(int(TOKEN.issued_at.timestamp())),
            str(int(TOKEN.expires_at.timestamp())),
        )
    )
    old_style = hmac.new(CLIENT_SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()
    assert old_style not in seal
    assert CLIENT_SECRET not in seal
    keyed_by_secret = SealKey(CLIENT_SECRET.encode().ljust(KEY_BYTES, b"\0"))
    assert keyed_by_secret.seal(CACHE_KEY, CREDENTIALS, TOKEN) != seal


def test_a_secret_sealed_with_another_key_is_not_reused() -> None:
    owner = Owner(namespace="shop", name="orders-api", uid="uid-1")
    other = SealKey(b"o" * KEY_BYTES)
    secret = render_secret(
        owner=owner,
        secret_name="orders-api",
        scope=SCOPE,
        token=TOKEN,
        seal=other.seal(CACHE_KEY, CREDENTIALS, TOKEN),
    )

    def reread(key: SealKey) -> AccessToken | None:
        return token_from_secret(
            secret,
            owner_uid="uid-1",
            scope=SCOPE,
            now=NOW + timedelta(minutes=1),
            seal_for=lambda token: key.seal(CACHE_KEY, CREDENTIALS, token),
        )

    assert reread(other) == TOKEN
    assert reread(KEY) is None


def test_the_key_never_shows_and_must_be_long_enough() -> None:
    assert "k" * 8 not in repr(KEY)
    assert "hidden" in repr(KEY)
    with pytest.raises(SealKeyError, match="32 bytes"):
        SealKey(b"short")


def _encoded(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_key_from_secret_reads_the_key() -> None:
    secret: JsonObject = {"data": {"key": _encoded(b"k" * KEY_BYTES)}}
    key = key_from_secret(secret, where="ops/seal")
    assert key.seal(CACHE_KEY, CREDENTIALS, TOKEN) == KEY.seal(CACHE_KEY, CREDENTIALS, TOKEN)


@pytest.mark.parametrize(
    "data",
    [{}, {"key": ""}, {"key": "not base64!"}, {"key": _encoded(b"too short")}],
)
def test_an_unusable_key_secret_says_what_to_do(data: dict[str, str]) -> None:
    with pytest.raises(SealKeyError) as raised:
        key_from_secret({"data": data}, where="ops/seal")
    message = str(raised.value)
    assert "Secret ops/seal" in message
    assert "delete the Secret" in message
    for value in data.values():
        if value:
            assert value not in message


def test_a_new_key_secret_holds_32_random_bytes() -> None:
    first = new_key_secret("ops", "seal")
    second = new_key_secret("ops", "seal")
    assert first["metadata"] == {**first["metadata"], "namespace": "ops", "name": "seal"}
    assert len(base64.b64decode(first["data"]["key"])) == KEY_BYTES
    assert first["data"]["key"] != second["data"]["key"]


class FakeKube:
    """The two calls `load_or_create` makes, against an in-memory store."""

    def __init__(self, stored: JsonObject | None = None, *, lose_race: bool = False) -> None:
        self.stored = stored
        self.lose_race = lose_race
        self.reads = 0
        self.creates: list[JsonObject] = []

    async def read_secret(self, namespace: str, name: str) -> JsonObject | None:
        self.reads += 1
        return self.stored

    async def create_secret(self, namespace: str, body: JsonObject) -> JsonObject:
        self.creates.append(body)
        if self.lose_race:
            # Another replica created it between our read and our create.
            self.stored = new_key_secret(namespace, body["metadata"]["name"])
            raise Conflict(action="create Secret", status=409, reason="AlreadyExists")
        self.stored = body
        return body


async def test_load_or_create_creates_the_key_once_and_reads_it_after() -> None:
    kube = FakeKube()
    first = await load_or_create(cast(KubeApi, kube), namespace="ops", name="seal")
    assert len(kube.creates) == 1
    again = await load_or_create(cast(KubeApi, kube), namespace="ops", name="seal")
    assert len(kube.creates) == 1  # the second start reads the same key
    assert again.seal(CACHE_KEY, CREDENTIALS, TOKEN) == first.seal(CACHE_KEY, CREDENTIALS, TOKEN)


async def test_load_or_create_uses_the_winners_key_after_a_409() -> None:
    kube = FakeKube(lose_race=True)
    key = await load_or_create(cast(KubeApi, kube), namespace="ops", name="seal")
    assert kube.stored is not None
    winner = key_from_secret(kube.stored, where="ops/seal")
    assert key.seal(CACHE_KEY, CREDENTIALS, TOKEN) == winner.seal(CACHE_KEY, CREDENTIALS, TOKEN)
    assert kube.creates[0]["data"] != kube.stored["data"]  # ours lost; theirs is used
    assert kube.reads == 2


def test_the_key_id_is_one_per_identity_and_scope_never_per_token() -> None:
    key_id = KEY.key_id(CACHE_KEY, CREDENTIALS)
    assert key_id.startswith("v2:")
    # Another token of the same key: the same id (the Secrets of a key are found by it).
    assert KEY.key_id(*_with(value="another.token.value")[:2]) == key_id
    # Another identity, scope or credential: another id.
    for change in (
        {"client_id": "client-2"},
        {"scope": "api://prod.orders.payments/.default"},
        {"client_secret": "rotated"},
    ):
        assert KEY.key_id(*_with(**change)[:2]) != key_id
    # Nobody without the seal key can compute it, and it is no seal.
    assert SealKey(b"o" * KEY_BYTES).key_id(CACHE_KEY, CREDENTIALS) != key_id
    assert key_id != KEY.seal(CACHE_KEY, CREDENTIALS, TOKEN)
