"""Claims decoded from a token's payload: what status.token shows, and nothing on bad input."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from m2m_token_operator.tokens.claims import (
    MAX_ROLE_LENGTH,
    MAX_ROLES,
    MAX_TOKEN_LENGTH,
    TokenClaims,
    decode_claims,
)
from m2m_token_operator.tokens.model import AccessToken

IAT = 1_795_942_800  # 2026-11-29T09:00:00Z
EXP = IAT + 3600


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def jwt(payload: Any, *, header: Any = None, signature: str = "c2lnbmF0dXJl") -> str:
    head = header if header is not None else {"alg": "RS256", "typ": "JWT", "kid": "k1"}
    return ".".join(
        (_b64(json.dumps(head).encode()), _b64(json.dumps(payload).encode()), signature)
    )


ENTRA_V2 = {
    "aud": "api://prod-gcp.orders.orders-api",
    "iss": "https://login.microsoftonline.com/tenant-1/v2.0",
    "iat": IAT,
    "nbf": IAT,
    "exp": EXP,
    "azp": "60dea49a-0000-4000-8000-000000000001",
    "tid": "tenant-1",
    "roles": ["access_as_application", "orders.read"],
    "sub": "secret-ish-object-id",
}


def test_entra_v2_token() -> None:
    claims = decode_claims(jwt(ENTRA_V2))
    assert claims == TokenClaims(
        audience="api://prod-gcp.orders.orders-api",
        client_id="60dea49a-0000-4000-8000-000000000001",
        tenant_id="tenant-1",
        roles=("access_as_application", "orders.read"),
        issued_at=datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC),
        expires_at=datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC),
    )
    assert claims.to_status() == {
        "audience": "api://prod-gcp.orders.orders-api",
        "clientId": "60dea49a-0000-4000-8000-000000000001",
        "tenantId": "tenant-1",
        "roles": ["access_as_application", "orders.read"],
        "issuedAt": "2026-11-29T09:00:00Z",
        "expiresAt": "2026-11-29T10:00:00Z",
    }


def test_status_never_holds_the_token_header_or_signature() -> None:
    token = jwt(ENTRA_V2, signature="U0lHTkFUVVJFLXNlY3JldA")
    claims = decode_claims(token)
    assert claims is not None
    text = json.dumps(claims.to_status())
    for part in token.split("."):
        assert part not in text
    assert "secret-ish-object-id" not in text  # `sub` is not shown
    assert "iss" not in claims.to_status()


def test_v1_token_uses_appid_when_azp_is_absent() -> None:
    payload = {**ENTRA_V2, "appid": "v1-client"}
    del payload["azp"]
    claims = decode_claims(jwt(payload))
    assert claims is not None
    assert claims.client_id == "v1-client"


def test_azp_wins_over_appid() -> None:
    claims = decode_claims(jwt({**ENTRA_V2, "appid": "other"}))
    assert claims is not None
    assert claims.client_id == ENTRA_V2["azp"]


def test_audience_list_gives_its_first_entry() -> None:
    claims = decode_claims(jwt({**ENTRA_V2, "aud": ["api://first", "api://second"]}))
    assert claims is not None
    assert claims.audience == "api://first"


@pytest.mark.parametrize("aud", [[], [42], 42, None, "", "x" * 1025, "bad\nline"])
def test_unusable_audience_is_none(aud: object) -> None:
    claims = decode_claims(jwt({**ENTRA_V2, "aud": aud}))
    assert claims is not None
    assert claims.audience is None
    assert claims.client_id == ENTRA_V2["azp"]  # the rest is still shown


def test_token_without_roles_has_empty_roles() -> None:
    payload = dict(ENTRA_V2)
    del payload["roles"]
    claims = decode_claims(jwt(payload))
    assert claims is not None
    assert claims.roles == ()
    assert claims.to_status()["roles"] == []


def test_minimal_payload_gives_claims_with_nothing_known() -> None:
    claims = decode_claims(jwt({}))
    assert claims == TokenClaims(None, None, None, (), None, None)
    assert claims.to_status() == {
        "audience": None,
        "clientId": None,
        "tenantId": None,
        "roles": [],
        "issuedAt": None,
        "expiresAt": None,
    }


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        ("single", ("single",)),
        (["a", 1, None, {"x": 1}, ["b"], "", "c"], ("a", "c")),
        (["a", "a", "b"], ("a", "b")),
        ({"a": 1}, ()),
        (7, ()),
        (["ok", "x" * (MAX_ROLE_LENGTH + 1), "x" * MAX_ROLE_LENGTH], ("ok", "x" * MAX_ROLE_LENGTH)),
        (["tab\there", "fine"], ("fine",)),
    ],
)
def test_roles_keep_only_bounded_strings(roles: object, expected: tuple[str, ...]) -> None:
    claims = decode_claims(jwt({**ENTRA_V2, "roles": roles}))
    assert claims is not None
    assert claims.roles == expected


def test_roles_are_capped() -> None:
    claims = decode_claims(jwt({**ENTRA_V2, "roles": [f"role-{i}" for i in range(1000)]}))
    assert claims is not None
    assert len(claims.roles) == MAX_ROLES
    assert claims.roles[0] == "role-0"


@pytest.mark.parametrize(
    "value", ["1795942800", True, -1, 10**20, float("inf"), float("nan"), None, [IAT]]
)
def test_unusable_times_are_none(value: object) -> None:
    # json.dumps writes inf/nan as Infinity/NaN, which json.loads reads back as floats.
    claims = decode_claims(jwt({**ENTRA_V2, "iat": value, "exp": value}))
    assert claims is not None
    assert (claims.issued_at, claims.expires_at) == (None, None)


def test_fractional_times_are_truncated_to_the_second() -> None:
    claims = decode_claims(jwt({**ENTRA_V2, "iat": IAT + 0.9}))
    assert claims is not None
    assert claims.issued_at == datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "opaque-token-value",
        "a.b",
        "a.b.c.d.e",  # JWE: five parts, payload encrypted
        ".eyJhIjoxfQ.",  # empty header
        "eyJhbGciOiJub25lIn0..sig",  # empty payload
        "eyJhbGciOiJub25lIn0.!!!.sig",  # not base64url
        "eyJhbGciOiJub25lIn0.eyJh IjoxfQ.sig",  # a space
        "eyJhbGciOiJub25lIn0.e.sig",  # a length base64 cannot have
        jwt("a string"),
        jwt([1, 2, 3]),
        jwt(None),
        jwt(42),
    ],
)
def test_not_a_jwt_gives_none(token: str) -> None:
    assert decode_claims(token) is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe\xfd",  # not UTF-8
        b'{"aud": "x"',  # truncated
        b"[" * 5000 + b"]" * 5000,  # nested deep enough to exhaust the parser
        b'{"exp": ' + b"9" * 5000 + b"}",  # an integer Python refuses to parse
    ],
)
def test_payload_not_a_json_object_gives_none(payload: bytes) -> None:
    token = f"{_b64(b'{}')}.{_b64(payload)}.sig"
    assert decode_claims(token) is None


def test_absurdly_large_token_is_not_decoded() -> None:
    token = jwt({**ENTRA_V2, "padding": "x" * MAX_TOKEN_LENGTH})
    assert len(token) > MAX_TOKEN_LENGTH
    assert decode_claims(token) is None


def test_unsigned_token_is_still_described() -> None:
    # alg "none" has an empty signature part; the operator only reports, never trusts.
    token = jwt(ENTRA_V2, header={"alg": "none"}, signature="")
    claims = decode_claims(token)
    assert claims is not None
    assert claims.tenant_id == "tenant-1"


def test_a_token_is_decoded_once_however_many_looks_show_it() -> None:
    token = AccessToken(
        value=jwt(ENTRA_V2),
        token_type="Bearer",
        issued_at=datetime.fromtimestamp(IAT, UTC),
        expires_at=datetime.fromtimestamp(EXP, UTC),
    )
    first = token.claims
    assert first == decode_claims(token.value)
    assert token.claims is first
    assert token == AccessToken(  # still equal by value: the claims are no field
        value=token.value,
        token_type="Bearer",
        issued_at=token.issued_at,
        expires_at=token.expires_at,
    )
