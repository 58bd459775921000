"""private_key_jwt: the JWK is checked strictly, and the assertion carries what Entra ID checks."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm
from pytest_httpserver import HTTPServer

from m2m_token_operator.tokens.assertion import (
    JWT_BEARER,
    InvalidKeyError,
    parse_private_jwk,
    private_members,
)
from m2m_token_operator.tokens.client import TokenClient
from m2m_token_operator.tokens.credentials import (
    CLIENT_SECRET,
    PRIVATE_KEY_JWT,
    CredentialsError,
    EndpointPolicy,
    credentials_from_secret,
    private_key_credentials,
)
from m2m_token_operator.tokens.redaction import REDACTOR

ENDPOINT = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
POLICY = EndpointPolicy(
    allowed_hosts=frozenset({"login.microsoftonline.com"}), allow_insecure_http=False
)


@cache
def rsa_key(bits: int = 2048, number: int = 0) -> rsa.RSAPrivateKey:
    """Generated once per size and number: key generation is the slow part of these tests."""
    del number  # only part of the cache key
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def jwk_of(key: rsa.RSAPrivateKey, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key))
    jwk["kid"] = "thumbprint-1"
    jwk.update(extra)
    return {name: value for name, value in jwk.items() if value is not None}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_data(jwk: dict[str, Any] | str | None, *, secret: str | None = None) -> dict[str, str]:
    data = {
        "AZURE_APP_CLIENT_ID": b64(CLIENT_ID),
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": b64(ENDPOINT),
    }
    if jwk is not None:
        data["AZURE_APP_JWK"] = b64(jwk if isinstance(jwk, str) else json.dumps(jwk))
    if secret is not None:
        data["AZURE_APP_CLIENT_SECRET"] = b64(secret)
    return data


# The assertion


def test_assertion_claims_and_header_verify_with_the_public_key() -> None:
    key = parse_private_jwk(json.dumps(jwk_of(rsa_key())))
    assertion = key.sign(client_id=CLIENT_ID, audience=ENDPOINT, now=NOW)

    header = jwt.get_unverified_header(assertion)
    assert header == {"alg": "RS256", "kid": "thumbprint-1", "typ": "JWT"}
    claims = jwt.decode(
        assertion,
        rsa_key().public_key(),
        algorithms=["RS256"],
        audience=ENDPOINT,
        issuer=CLIENT_ID,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    now = int(NOW.timestamp())
    assert claims["sub"] == CLIENT_ID
    assert claims["nbf"] == claims["iat"] == now
    assert now < claims["exp"] <= now + 600
    assert uuid.UUID(claims["jti"]).version == 4


def test_every_assertion_has_a_fresh_jti() -> None:
    key = parse_private_jwk(json.dumps(jwk_of(rsa_key())))
    assertions = [key.sign(client_id=CLIENT_ID, audience=ENDPOINT, now=NOW) for _ in range(3)]
    jtis = {jwt.decode(a, options={"verify_signature": False})["jti"] for a in assertions}
    assert len(jtis) == 3


def test_x5t_is_sent_when_the_jwk_has_it() -> None:
    key = parse_private_jwk(json.dumps(jwk_of(rsa_key(), x5t="c2hhMS10aHVtYnByaW50")))
    assertion = key.sign(client_id=CLIENT_ID, audience=ENDPOINT, now=NOW)
    assert jwt.get_unverified_header(assertion)["x5t"] == "c2hhMS10aHVtYnByaW50"


def test_a_key_with_only_n_e_d_is_usable() -> None:
    jwk = {name: value for name, value in jwk_of(rsa_key()).items() if name in "kty kid n e d"}
    key = parse_private_jwk(json.dumps(jwk))
    assertion = key.sign(client_id=CLIENT_ID, audience=ENDPOINT, now=NOW)
    jwt.decode(
        assertion,
        rsa_key().public_key(),
        algorithms=["RS256"],
        audience=ENDPOINT,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )


# Unusable keys: each problem named, never the key


def _ec_jwk() -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    return {**jwk, "kid": "ec"}


def _public_only() -> dict[str, Any]:
    return {k: v for k, v in jwk_of(rsa_key()).items() if k in ("kty", "kid", "n", "e")}


def _broken_members() -> dict[str, Any]:
    jwk = jwk_of(rsa_key())
    jwk["p"] = jwk_of(rsa_key(2048, 1))["p"]  # a prime of another key
    return jwk


@pytest.mark.parametrize(
    ("jwk", "problem"),
    [
        ("not json {", "it is not JSON"),
        ("[1, 2]", "it is not a JSON object"),
        (lambda: _ec_jwk(), "its kty is 'EC', and only RSA keys are supported"),
        (lambda: {"kty": "oct", "k": "c2VjcmV0", "kid": "x"}, "its kty is 'oct'"),
        (lambda: jwk_of(rsa_key(), kid=None), "it has no kid"),
        (lambda: jwk_of(rsa_key(), kid=" "), "it has no kid"),
        (_public_only, "it holds only the public key (no private exponent d)"),
        (_broken_members, "its members do not form a valid RSA private key"),
        (lambda: jwk_of(rsa_key(1024)), "it is 1024 bits long, and at least 2048 are required"),
    ],
    ids=["not-json", "array", "ec", "oct", "no-kid", "blank-kid", "public", "broken", "small"],
)
def test_unusable_jwk_is_named_never_shown(jwk: Any, problem: str) -> None:
    text = jwk if isinstance(jwk, str) else json.dumps(jwk())
    with pytest.raises(InvalidKeyError) as caught:
        parse_private_jwk(text)
    assert problem in str(caught.value)
    with pytest.raises(CredentialsError) as from_secret:
        credentials_from_secret(secret_data(text), namespace="shop", name="azure", policy=POLICY)
    assert from_secret.value.reason == "CredentialsInvalid"
    message = str(from_secret.value)
    assert message.startswith("Credentials Secret shop/azure: AZURE_APP_JWK is not a usable")
    assert problem in message
    assert from_secret.value.__cause__ is None
    for value in private_members(text):
        assert value not in message
        assert value[:12] not in message


# Credentials Secrets with a key


def test_the_private_key_is_preferred_over_the_client_secret() -> None:
    credentials = credentials_from_secret(
        secret_data(jwk_of(rsa_key()), secret="also-a-secret"),
        namespace="shop",
        name="azure",
        policy=POLICY,
    )
    assert credentials.method == PRIVATE_KEY_JWT
    assert credentials.client_secret is None
    assert credentials.client_assertion is not None
    assertion = credentials.client_assertion()
    claims = jwt.decode(
        assertion, rsa_key().public_key(), algorithms=["RS256"], audience=ENDPOINT, leeway=5
    )
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert JWT_BEARER.endswith(":jwt-bearer")
    # Registered before it can reach any log line.
    assert REDACTOR.scrub(f"sent {assertion}") == "sent [REDACTED]"


def test_the_client_secret_alone_still_works() -> None:
    credentials = credentials_from_secret(
        secret_data(None, secret="only-a-secret"), namespace="shop", name="azure", policy=POLICY
    )
    assert credentials.method == CLIENT_SECRET
    assert credentials.client_secret == "only-a-secret"


def test_neither_key_nor_secret_is_missing() -> None:
    with pytest.raises(CredentialsError) as caught:
        credentials_from_secret(secret_data(None), namespace="shop", name="azure", policy=POLICY)
    assert caught.value.reason == "CredentialsMissing"
    assert "AZURE_APP_JWK or AZURE_APP_CLIENT_SECRET" in str(caught.value)


def test_key_fingerprints_tell_keys_apart_and_never_hold_the_key() -> None:
    def read(key: rsa.RSAPrivateKey, **extra: Any) -> str:
        data = secret_data(jwk_of(key, **extra))
        return credentials_from_secret(
            data, namespace="shop", name="azure", policy=POLICY
        ).fingerprint()

    first = read(rsa_key())
    assert read(rsa_key(), kid="renamed") == first  # the same key, however it is labelled
    assert read(rsa_key(2048, 1)) != first  # rotated in place
    for value in private_members(json.dumps(jwk_of(rsa_key()))):
        assert value not in first


def test_the_jwk_never_shows_in_repr() -> None:
    jwk = jwk_of(rsa_key())
    credentials = credentials_from_secret(
        secret_data(jwk), namespace="shop", name="azure", policy=POLICY
    )
    text = repr(credentials) + repr(parse_private_jwk(json.dumps(jwk)))
    for value in private_members(json.dumps(jwk)):
        assert value not in text


# On the wire (a real HTTP server on loopback)


async def test_private_key_jwt_form_on_the_wire(
    httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    endpoint = httpserver.url_for("/tenant/oauth2/v2.0/token")
    httpserver.expect_request("/tenant/oauth2/v2.0/token", method="POST").respond_with_json(
        {"token_type": "Bearer", "expires_in": 3599, "access_token": "issued-token-value"}
    )
    credentials = private_key_credentials(
        token_endpoint=endpoint,
        client_id=CLIENT_ID,
        jwk=json.dumps(jwk_of(rsa_key(), x5t="c2hhMS10aHVtYnByaW50")),
        source="Secret shop/azure",
    )
    client = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        token = await client.fetch(credentials, "api://x/.default")
    finally:
        await client.aclose()
    assert token.value == "issued-token-value"
    [(request, _)] = httpserver.log
    form = parse_qs(request.get_data(as_text=True), strict_parsing=True)
    assert set(form) == {
        "client_id",
        "client_assertion_type",
        "client_assertion",
        "grant_type",
        "scope",
    }  # no client_secret
    assert form["client_assertion_type"] == [JWT_BEARER]
    [assertion] = form["client_assertion"]
    claims = jwt.decode(
        assertion, rsa_key().public_key(), algorithms=["RS256"], audience=endpoint, leeway=5
    )
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["exp"] - claims["iat"] <= 600
    header = jwt.get_unverified_header(assertion)
    assert (header["kid"], header["x5t"]) == ("thumbprint-1", "c2hhMS10aHVtYnByaW50")


def test_the_private_members_are_registered_with_the_redactor() -> None:
    jwk = jwk_of(rsa_key(2048, 2))
    credentials_from_secret(secret_data(jwk), namespace="shop", name="azure", policy=POLICY)
    assert REDACTOR.scrub(f"d={jwk['d']} p={jwk['p']}") == "d=[REDACTED] p=[REDACTED]"
