"""An application key pair as an identity provisioning operator writes it: a private RSA JWK.

For the demo and the tests of `private_key_jwt`: `new_application_jwk()` makes
an RSA key and a self-signed certificate for it, and returns the private JWK
(what goes into a credentials Secret's `AZURE_APP_JWK`) and its public half
(what the app registration holds; register it with the token front). As with
the identity provisioning operator, `kid` and `x5t` are the certificate's SHA-1
thumbprint (base64url), which Entra ID matches for RS256 client assertions.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

__all__ = ["PRIVATE_MEMBERS", "new_application_jwk"]

PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_application_jwk(name: str = "m2m-demo-app") -> tuple[dict[str, Any], dict[str, Any]]:
    """(private JWK, public JWK) of a new 2048-bit RSA key with a self-signed certificate."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    thumbprint = _b64url(hashlib.sha1(der).digest())  # noqa: S324 (x5t is SHA-1 by definition)
    private: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    private.update(
        kid=thumbprint,
        x5t=thumbprint,
        x5c=[base64.b64encode(der).decode("ascii")],
        use="sig",
        alg="RS256",
    )
    public = {k: v for k, v in private.items() if k not in PRIVATE_MEMBERS}
    return private, public
