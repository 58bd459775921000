"""What an access token says about itself: its audience, client, tenant and app roles.

The most common support question about machine-to-machine tokens is "why does
the API answer 403?", and the answer is almost always in the token's claims: the
wrong audience, or no `roles` because the target never granted this client an
app role. Users should never have to copy the token out of its Secret to see
that, so the operator decodes the few claims worth showing and publishes them in
`status.token`.

The payload is decoded WITHOUT verifying the signature: the operator is not the
token's audience and has no business validating it; it only reports what the
issuer wrote. Nothing here ever returns the token, its header or its signature.
The input is untrusted: anything that is not a compact JWS with a JSON object as
payload, or is absurdly large, yields None; a claim of the wrong type or size is
left out rather than guessed at.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from m2m_token_operator.api.timefmt import format_time

# Entra ID tokens are a few kilobytes; a token with thousands of roles or groups is
# still far below this. Anything larger is not decoded at all.
MAX_TOKEN_LENGTH = 64 * 1024
MAX_ROLES = 64
MAX_ROLE_LENGTH = 256
MAX_TEXT_LENGTH = 1024  # audience (an application ID URI may be long), client and tenant ids
# 9999-12-31T23:59:59Z: beyond it a time is certainly garbage (and `datetime` overflows).
_MAX_EPOCH = 253_402_300_799

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class TokenClaims:
    """The claims `status.token` shows; each None (roles: empty) when absent or unusable."""

    audience: str | None  # `aud`; the first entry when it is a list
    client_id: str | None  # `azp` (v2.0 tokens), else `appid` (v1.0 tokens)
    tenant_id: str | None  # `tid`
    roles: tuple[str, ...]  # `roles`: the app roles the target granted this client
    issued_at: datetime | None  # `iat`
    expires_at: datetime | None  # `exp`

    def to_status(self) -> dict[str, Any]:
        """`status.token`: every key present, None where unknown.

        A JSON merge patch keeps keys it does not mention, so a claim that a new
        token lacks must be sent as null to disappear from the status.
        """
        return {
            "audience": self.audience,
            "clientId": self.client_id,
            "tenantId": self.tenant_id,
            "roles": list(self.roles),
            "issuedAt": _format(self.issued_at),
            "expiresAt": _format(self.expires_at),
        }


def _format(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def _text(value: object, *, limit: int) -> str | None:
    """A printable, non-empty string of at most `limit` characters; anything else None."""
    if not isinstance(value, str) or not value or len(value) > limit:
        return None
    if not value.isprintable():  # control characters would garble terminals and logs
        return None
    return value


def _time(value: object) -> datetime | None:
    """A NumericDate (seconds since the epoch, RFC 7519) as an aware UTC datetime."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0 <= value <= _MAX_EPOCH:
        return None
    return datetime.fromtimestamp(int(value), UTC)


def _audience(value: object) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return _text(value, limit=MAX_TEXT_LENGTH)


def _roles(value: object) -> tuple[str, ...]:
    """At most MAX_ROLES distinct roles, in the token's order; malformed entries left out.

    A single string (not a list) is taken as one role: some issuers shorten a
    one-element list that way.
    """
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    roles: list[str] = []
    for entry in value:
        role = _text(entry, limit=MAX_ROLE_LENGTH)
        if role is not None and role not in roles:
            roles.append(role)
            if len(roles) == MAX_ROLES:
                break
    return tuple(roles)


def _payload(token: str) -> Mapping[str, Any] | None:
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    parts = token.split(".")
    # A signed JWT in compact form has exactly three parts; an encrypted one (JWE) has
    # five and its payload cannot be read: not a JWT we can describe.
    if len(parts) != 3 or not all(_BASE64URL.fullmatch(part) for part in parts[:2]):
        return None
    encoded = parts[1]
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        payload = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError):
        # ValueError covers invalid JSON and integers with too many digits.
        return None
    return payload if isinstance(payload, dict) else None


def decode_claims(token: str) -> TokenClaims | None:
    """The claims of `token`, unverified; None when it is not a readable JWT."""
    payload = _payload(token)
    if payload is None:
        return None
    client_id = _text(payload.get("azp"), limit=MAX_TEXT_LENGTH)
    if client_id is None:
        client_id = _text(payload.get("appid"), limit=MAX_TEXT_LENGTH)
    return TokenClaims(
        audience=_audience(payload.get("aud")),
        client_id=client_id,
        tenant_id=_text(payload.get("tid"), limit=MAX_TEXT_LENGTH),
        roles=_roles(payload.get("roles")),
        issued_at=_time(payload.get("iat")),
        expires_at=_time(payload.get("exp")),
    )
