"""private_key_jwt (RFC 7523): a client proves its identity with a JWT it signs itself.

An identity provisioning operator writes the application's private key as a JWK
(`AZURE_APP_JWK`). Unlike a client secret, the key itself never travels: each
token request carries a short-lived assertion signed with it, so a request
recorded on the way cannot be replayed for long, and the same key can serve
the sidecar that uses it elsewhere.

Parsing is strict because a key that is not a usable private RSA key would
otherwise surface as an opaque rejection by the token endpoint: every problem
becomes an `InvalidKeyError` naming the problem, and never any part of the
key (the caller turns it into a `CredentialsInvalid` status). Signing is
PyJWT's (with `cryptography`), never written by hand. Pure functions: no HTTP,
no Kubernetes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

JWK_KEY = "AZURE_APP_JWK"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHM = "RS256"
MIN_KEY_BITS = 2048
# Entra ID accepts assertions valid for at most about 10 minutes; shorter is safer anyway.
LIFETIME = timedelta(minutes=5)
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi")


@dataclass(frozen=True)
class PrivateKey:
    """A usable private RSA key from a JWK, with the header fields that name it."""

    kid: str
    x5t: str | None
    key: rsa.RSAPrivateKey = field(repr=False)
    # The private numbers in a canonical form: what the cache fingerprint is taken of.
    material: bytes = field(repr=False)

    def sign(self, *, client_id: str, audience: str, now: datetime) -> str:
        """A fresh client assertion: RS256, `aud` the token endpoint, `iss` = `sub` = client id."""
        issued = int(now.timestamp())
        claims = {
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": str(uuid.uuid4()),
            "nbf": issued,
            "iat": issued,
            "exp": issued + int(LIFETIME.total_seconds()),
        }
        headers: dict[str, Any] = {"kid": self.kid, "typ": "JWT"}
        if self.x5t:
            headers["x5t"] = self.x5t
        return jwt.encode(claims, self.key, algorithm=ALGORITHM, headers=headers)

    def seal_secret(self) -> str:
        """A secret derived from the key, for binding a token to this identity (an HMAC key)."""
        return hmac.new(self.material, b"m2m-token-operator seal", hashlib.sha256).hexdigest()


class InvalidKeyError(ValueError):
    """A JWK that is not a usable private RSA key; the message names the problem, not the key."""


def _invalid(problem: str) -> InvalidKeyError:
    return InvalidKeyError(problem)


def parse_private_jwk(text: str) -> PrivateKey:
    """The private RSA key of a JWK; `InvalidKeyError` says what is wrong with it."""
    try:
        jwk: Any = json.loads(text)
    except (ValueError, RecursionError):
        raise _invalid("it is not JSON") from None
    if not isinstance(jwk, Mapping):
        raise _invalid("it is not a JSON object")
    kty = jwk.get("kty")
    if kty != "RSA":
        shown = kty if isinstance(kty, str) and kty.isalnum() and len(kty) <= 10 else "?"
        raise _invalid(f"its kty is {shown!r}, and only RSA keys are supported")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid.strip():
        raise _invalid("it has no kid (the key id the token endpoint knows it by)")
    if "d" not in jwk:
        raise _invalid("it holds only the public key (no private exponent d)")
    x5t = jwk.get("x5t")
    if x5t is not None and not isinstance(x5t, str):
        raise _invalid("its x5t is not a string")
    try:
        key = RSAAlgorithm.from_jwk(dict(jwk))
    except Exception:  # PyJWT and cryptography raise various errors for a broken key
        # Not chained: their messages may quote parts of the key.
        raise _invalid(
            "its members do not form a valid RSA private key (check n, e, d, p, q, dp, dq, qi)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise _invalid("it holds only the public key")
    if key.key_size < MIN_KEY_BITS:
        raise _invalid(f"it is {key.key_size} bits long, and at least {MIN_KEY_BITS} are required")
    numbers = key.private_numbers()
    material = "\n".join(
        str(value)
        for value in (
            numbers.public_numbers.n,
            numbers.public_numbers.e,
            numbers.d,
            numbers.p,
            numbers.q,
        )
    ).encode()
    return PrivateKey(kid=kid.strip(), x5t=x5t or None, key=key, material=material)


def private_members(jwk_text: str) -> list[str]:
    """The private members' values of a JWK, to register with the log redactor."""
    try:
        jwk = json.loads(jwk_text)
    except (ValueError, RecursionError):
        return []
    if not isinstance(jwk, Mapping):
        return []
    return [value for name in _PRIVATE_MEMBERS if isinstance(value := jwk.get(name), str)]
