"""The verifying token front: client assertions checked as Entra ID checks them.

A real HTTP server (the front) in front of a real loopback upstream
(pytest-httpserver standing in for mock-oauth2-server).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from devenv.jwk import PRIVATE_MEMBERS, new_application_jwk
from devenv.tokenfront import ASSERTION_TYPE, FEDERATION_AUDIENCE, VerifyingFront

CLIENT_ID = "app-with-key"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
SA_SUBJECT = "system:serviceaccount:shop:frontend"
FEDERATED_CLIENT = "app-federated"


@pytest.fixture
def upstream(httpserver: HTTPServer) -> HTTPServer:
    """Answers every token request with a token naming the form it received."""

    def answer(request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs(request.get_data(as_text=True)).items()}
        body = {"access_token": "tok", "expires_in": 3599, "token_type": "Bearer", "form": form}
        return Response(json.dumps(body), content_type="application/json")

    httpserver.expect_request("/default/token", method="POST").respond_with_handler(answer)
    return httpserver


@pytest.fixture
def front(upstream: HTTPServer) -> Iterator[VerifyingFront]:
    server = VerifyingFront(upstream.url_for("/").rstrip("/"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    return jwk


def _endpoint(front: VerifyingFront) -> str:
    return f"http://127.0.0.1:{front.port}/default/token"


def _assertion(
    key: rsa.RSAPrivateKey,
    front: VerifyingFront,
    *,
    lifetime: int = 300,
    **overrides: Any,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": _endpoint(front),
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "iat": now,
        "exp": now + lifetime,
    }
    claims.update(overrides)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def _post(front: VerifyingFront, **form: str) -> requests.Response:
    return requests.post(_endpoint(front), data=form, timeout=10)


def _with_assertion(front: VerifyingFront, assertion: str, client_id: str = CLIENT_ID) -> Any:
    return _post(
        front,
        client_id=client_id,
        client_assertion_type=ASSERTION_TYPE,
        client_assertion=assertion,
        grant_type="client_credentials",
        scope="api://x/.default",
    )


def _assert_rejected(response: requests.Response, code: int, text: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "invalid_client"
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert text in body["error_description"]


def test_a_good_assertion_is_forwarded_as_a_client_credentials_request(
    front: VerifyingFront, rsa_key: rsa.RSAPrivateKey
) -> None:
    front.register_jwk(CLIENT_ID, _public_jwk(rsa_key, "k1"))
    response = _with_assertion(front, _assertion(rsa_key, front))
    assert response.status_code == 200, response.text
    forwarded = response.json()["form"]
    assert forwarded["client_id"] == CLIENT_ID
    assert forwarded["scope"] == "api://x/.default"
    assert "client_assertion" not in forwarded  # upstream cannot verify it; the front did
    assert forwarded["client_secret"]
    assert [r.accepted for r in front.requests_for(CLIENT_ID)] == [True]


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"aud": "https://login.microsoftonline.com/t/oauth2/v2.0/token"}, "InvalidAudience"),
        ({"sub": "someone-else"}, "sub 'someone-else' is not the client id"),
        ({"iss": "someone-else"}, "InvalidIssuer"),
        ({"lifetime": 601}, "exceeds 600s"),
        ({"exp": int(time.time()) - 60}, "ExpiredSignature"),
    ],
)
def test_a_wrong_claim_is_rejected(
    front: VerifyingFront, rsa_key: rsa.RSAPrivateKey, overrides: dict[str, Any], text: str
) -> None:
    front.register_jwk(CLIENT_ID, _public_jwk(rsa_key, "k1"))
    response = _with_assertion(front, _assertion(rsa_key, front, **overrides))
    _assert_rejected(response, 700027, text)


def test_a_wrong_signature_is_rejected(front: VerifyingFront, rsa_key: rsa.RSAPrivateKey) -> None:
    front.register_jwk(CLIENT_ID, _public_jwk(rsa_key, "k1"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _assert_rejected(
        _with_assertion(front, _assertion(other, front)), 700027, "InvalidSignatureError"
    )
    assert [r.accepted for r in front.requests_for(CLIENT_ID)] == [False]


def test_a_replayed_jti_is_rejected(front: VerifyingFront, rsa_key: rsa.RSAPrivateKey) -> None:
    front.register_jwk(CLIENT_ID, _public_jwk(rsa_key, "k1"))
    assertion = _assertion(rsa_key, front)
    assert _with_assertion(front, assertion).status_code == 200
    _assert_rejected(_with_assertion(front, assertion), 700027, "replay")


def test_an_assertion_for_an_unregistered_client_is_rejected_when_strict(
    front: VerifyingFront, rsa_key: rsa.RSAPrivateKey
) -> None:
    passed = _with_assertion(front, _assertion(rsa_key, front))
    assert passed.json()["form"]["client_assertion"]  # not strict: upstream, unverified
    front.strict = True
    _assert_rejected(_with_assertion(front, _assertion(rsa_key, front)), 700016, CLIENT_ID)


def test_client_secrets_pass_through_unless_a_secret_is_registered(
    front: VerifyingFront,
) -> None:
    plain = _post(front, client_id="any", client_secret="x", grant_type="client_credentials")
    assert plain.status_code == 200
    assert plain.json()["form"]["client_secret"] == "x"
    front.register_secret("checked", "right")
    good = _post(front, client_id="checked", client_secret="right", grant_type="client_credentials")
    assert good.status_code == 200
    wrong = _post(front, client_id="checked", client_secret="wrong", grant_type="x")
    _assert_rejected(wrong, 7000215, "Invalid client secret")


@pytest.fixture(scope="module")
def issuer_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _issuer_jwks(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="sa-key", use="sig", alg="ES256")
    return {"keys": [jwk]}


def _service_account_token(key: ec.EllipticCurvePrivateKey, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": SA_ISSUER,
        "sub": SA_SUBJECT,
        "aud": [FEDERATION_AUDIENCE],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "sa-key"})


@pytest.fixture
def federated_front(
    front: VerifyingFront, issuer_key: ec.EllipticCurvePrivateKey
) -> VerifyingFront:
    front.register_federated(
        FEDERATED_CLIENT,
        subject=SA_SUBJECT,
        issuer=SA_ISSUER,
        jwks=lambda: _issuer_jwks(issuer_key),
    )
    return front


def test_a_service_account_token_of_the_trusted_issuer_is_accepted(
    federated_front: VerifyingFront, issuer_key: ec.EllipticCurvePrivateKey
) -> None:
    response = _with_assertion(
        federated_front, _service_account_token(issuer_key), client_id=FEDERATED_CLIENT
    )
    assert response.status_code == 200, response.text
    assert response.json()["form"]["client_id"] == FEDERATED_CLIENT


@pytest.mark.parametrize(
    ("overrides", "code", "text"),
    [
        ({"sub": "system:serviceaccount:shop:other"}, 70021, "No matching federated identity"),
        ({"aud": ["api://other"]}, 700027, "InvalidAudience"),
        ({"iss": "https://other-cluster"}, 700027, "InvalidIssuer"),
        ({"exp": int(time.time()) - 60}, 700027, "ExpiredSignature"),
    ],
)
def test_a_service_account_token_that_does_not_match_is_rejected(
    federated_front: VerifyingFront,
    issuer_key: ec.EllipticCurvePrivateKey,
    overrides: dict[str, Any],
    code: int,
    text: str,
) -> None:
    token = _service_account_token(issuer_key, **overrides)
    _assert_rejected(_with_assertion(federated_front, token, FEDERATED_CLIENT), code, text)


def test_a_service_account_token_of_another_key_is_rejected(
    federated_front: VerifyingFront,
) -> None:
    forged = _service_account_token(ec.generate_private_key(ec.SECP256R1()))
    _assert_rejected(
        _with_assertion(federated_front, forged, FEDERATED_CLIENT), 700027, "InvalidSignature"
    )


def test_an_application_jwk_signs_assertions_the_front_accepts(
    front: VerifyingFront,
) -> None:
    """devenv.jwk makes what an identity provisioning operator writes: kid = x5t."""
    private, public = new_application_jwk()
    assert private["kid"] == private["x5t"]
    assert not set(PRIVATE_MEMBERS) & set(public)
    front.register_jwk(CLIENT_ID, public)
    signing_key = jwt.PyJWK(private, algorithm="RS256")
    now = int(time.time())
    assertion = jwt.encode(
        {
            "aud": _endpoint(front),
            "iss": CLIENT_ID,
            "sub": CLIENT_ID,
            "jti": str(uuid.uuid4()),
            "nbf": now,
            "exp": now + 300,
        },
        signing_key.key,
        algorithm="RS256",
        headers={"kid": private["kid"], "x5t": private["x5t"]},
    )
    assert _with_assertion(front, assertion).status_code == 200
