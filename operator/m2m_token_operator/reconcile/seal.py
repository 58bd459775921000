"""The restart seal: proof that a token in a tenant's Secret was written by this operator.

After a restart the operator takes unexpired tokens back from the Secrets it
wrote, so that a restart costs no call to the token endpoint and no write. Those
Secrets live in tenants' namespaces and their users may edit them, so a token
is taken back only when the Secret's `m2m.dev/seal` annotation verifies: an
HMAC-SHA256 over the token, its times, and everything its cache entry stands
for (endpoint, client id, scope, the credential).

The HMAC key is the operator's own: 32 random bytes in a Secret in the
operator's namespace (`m2m-token-operator-seal-key`), created once by whichever
replica starts first and shared by all of them, so a failover costs nothing
either. It used to be the client secret, which made every published seal an
offline oracle for guessing that secret, and gave identities without a secret
no seal at all. Nobody outside the operator's namespace can compute a seal
now; deleting the key Secret only costs one token request per key on the next
restart.

The credential enters the seal only as an HMAC under the same key, never in
the clear: a secret rotated while the operator was down changes the seal, so
the old token is not reused for the new credential.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

from m2m_token_operator.api.constants import JsonObject
from m2m_token_operator.kube.kube_api import Conflict, KubeApi

if TYPE_CHECKING:
    from m2m_token_operator.tokens.cache import CacheKey
    from m2m_token_operator.tokens.credentials import ClientCredentials
    from m2m_token_operator.tokens.model import AccessToken

logger = logging.getLogger(__name__)

KEY_DATA_KEY = "key"
KEY_BYTES = 32
# Seals made with a key: a version prefix, so that a seal of the old kind (keyed by the
# client secret) can never verify and is recognisably old when someone looks.
SEAL_PREFIX = "v2:"


class SealKeyError(RuntimeError):
    """The seal key Secret exists but holds no usable key; the message says what to do."""


class SealKey:
    """An HMAC key only the operator holds. Never logged; repr shows nothing of it."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise SealKeyError(f"a seal key must have at least {KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "SealKey(<hidden>)"

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def credential_binding(self, credentials: ClientCredentials) -> str:
        """The credential, as seen through the key: equal for an unchanged credential only.

        `seal_secret` is stable across restarts (unlike the cache key's fingerprint, whose
        key is per process): the client secret, a secret derived from the private key, or
        a ServiceAccount's namespace/name/uid.
        """
        return self._mac(b"credential\n" + credentials.seal_secret.encode())

    def key_id(self, key: CacheKey, credentials: ClientCredentials) -> str:
        """Which cache entry a Secret's token belongs to, without the token: equal for the
        Secrets of one identity and scope, so that a start finds one of them per key (and
        reads only that one) from the Secrets' metadata. Nobody without the key can tell
        which identity it stands for."""
        message = "\n".join(
            (
                "key",
                key.token_endpoint,
                key.client_id,
                key.scope,
                self.credential_binding(credentials),
            )
        )
        return SEAL_PREFIX + self._mac(message.encode())

    def seal(self, key: CacheKey, credentials: ClientCredentials, token: AccessToken) -> str:
        """The seal written beside `token` in its Secret, for the cache entry `key`."""
        message = "\n".join(
            (
                "seal",
                key.token_endpoint,
                key.client_id,
                key.scope,
                self.credential_binding(credentials),
                token.value,
                token.token_type,
                str(int(token.issued_at.timestamp())),
                str(int(token.expires_at.timestamp())),
            )
        )
        return SEAL_PREFIX + self._mac(message.encode())


def key_from_secret(secret: JsonObject, *, where: str) -> SealKey:
    """The key held in the Secret's data, or SealKeyError naming the Secret (never the key)."""
    encoded = (secret.get("data") or {}).get(KEY_DATA_KEY)
    try:
        raw = base64.b64decode(str(encoded), validate=True) if encoded else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) < KEY_BYTES:
        raise SealKeyError(
            f"Secret {where} has no usable seal key (data.{KEY_DATA_KEY} must hold at least"
            f" {KEY_BYTES} random bytes): delete the Secret and the operator creates a new"
            " one at its next start (tokens in Secrets are then fetched once more)"
        )
    return SealKey(raw)


def new_key_secret(namespace: str, name: str) -> JsonObject:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "m2m-token-operator",
                "app.kubernetes.io/component": "seal-key",
            },
            "annotations": {
                "m2m.dev/purpose": "HMAC key of the restart seals on token Secrets; keep it here."
                " Deleting it costs one token request per token at the next restart.",
            },
        },
        "data": {KEY_DATA_KEY: base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")},
    }


async def load_or_create(kube: KubeApi, *, namespace: str, name: str) -> SealKey:
    """Read the seal key Secret, or create it once; another replica's create wins a race."""
    where = f"{namespace}/{name}"
    secret = await kube.read_secret(namespace, name)
    if secret is None:
        try:
            secret = await kube.create_secret(namespace, new_key_secret(namespace, name))
            logger.info("Created the seal key Secret %s", where)
        except Conflict:
            # Another replica created it between our read and our create: use theirs.
            secret = await kube.read_secret(namespace, name)
            if secret is None:
                raise SealKeyError(
                    f"Secret {where} was created by someone else and is gone again"
                ) from None
    return key_from_secret(secret, where=where)
