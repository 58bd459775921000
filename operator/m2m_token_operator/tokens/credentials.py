"""Where an identity comes from, how it proves itself, and where it may be sent.

An identity is a client id, the token endpoint, and one way of proving it: a
client secret, a private key that signs a fresh assertion per request
(private_key_jwt), or a ServiceAccount token minted per request (workload
identity federation, see `federation`). The operator has its own (environment
variables, or files of a mounted Secret that an identity operator rotates in
place), and a TokenRequest may name a Secret or a ServiceAccount in its own
namespace holding another.

A token is only ever shared between requests presenting the same credential:
`ClientCredentials.fingerprint` is a keyed hash of the secret, of the private
key, or of the ServiceAccount's namespace, name and uid, and it is part of the
cache key.

A Secret's token endpoint is written by whoever can write Secrets in that
namespace, yet the operator would POST the secret there: without a check, a
namespace could point the operator at a server of its choosing. The endpoint
allow-list (`EndpointPolicy`) closes that door. The operator's own identity is
configured by the operator's administrator and only ever goes to its own
endpoint, so it is not held to the list.

No tokens here, and no Kubernetes API calls: the caller reads the Secret.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import os
import re
import secrets as _random_bytes
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import urllib3.util

from m2m_token_operator.api.constants import (
    CREDENTIALS_INVALID,
    CREDENTIALS_MISSING,
    ENDPOINT_NOT_ALLOWED,
)
from m2m_token_operator.tokens.assertion import (
    JWK_KEY,
    InvalidKeyError,
    parse_private_jwk,
    private_members,
)
from m2m_token_operator.tokens.redaction import REDACTOR

CLIENT_ID_KEY = "AZURE_APP_CLIENT_ID"
# Key names, not secrets.
CLIENT_SECRET_KEY = "AZURE_APP_CLIENT_SECRET"
TOKEN_ENDPOINT_KEY = "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT"
KEYS = (CLIENT_ID_KEY, CLIENT_SECRET_KEY, TOKEN_ENDPOINT_KEY)
# A credentials Secret: both of these, and a private key (preferred) or a client secret.
SECRET_REQUIRED_KEYS = (CLIENT_ID_KEY, TOKEN_ENDPOINT_KEY)
SECRET_PROOF_KEYS = (JWK_KEY, CLIENT_SECRET_KEY)

# How an identity proves itself on the wire.
CLIENT_SECRET = "client_secret"
PRIVATE_KEY_JWT = "private_key_jwt"
FEDERATED = "workload_identity_federation"


OPERATOR_IDENTITY = "operator identity"

# Fingerprints only ever compare two credentials held by this process; a per-process key
# makes a fingerprint that leaked into a heap dump useless for guessing the secret.
_FINGERPRINT_KEY = _random_bytes.token_bytes(32)
# A DNS name or IPv4 address, or a bracketed IPv6 address, then an optional port.
_NETLOC = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")


class CredentialsError(Exception):
    """An identity that cannot be used; `reason` is the status condition's reason."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClientCredentials:
    """One identity: how it proves itself, to which token endpoint. Secrets never show in repr.

    Exactly one proof: `client_secret` (sent in the form), or `client_assertion`,
    a callable producing a fresh assertion for each request (a JWT signed with a
    private key, or a minted ServiceAccount token). The callable may block: the
    token client calls it on a thread of its own, right before the request.
    """

    token_endpoint: str
    client_id: str
    source: str  # for people: "operator identity" or "Secret shop/azure-shop-frontend"
    method: str  # CLIENT_SECRET, PRIVATE_KEY_JWT or FEDERATED
    # What the fingerprint is a keyed hash of: the secret, the private key's numbers, or
    # the ServiceAccount's namespace/name/uid.
    material: bytes = field(repr=False)
    client_secret: str | None = field(default=None, repr=False)
    client_assertion: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    # Binds a sealed token to this credential: an input of the seal's HMAC, whose key is
    # the operator's own seal key (seal.SealKey.credential_binding), never this value.
    # Stable across restarts, unlike the fingerprint: the client secret, a secret derived
    # from the private key, or, for a ServiceAccount, which holds no secret, its identity
    # (see docs/security.md).
    seal_secret: str = field(default="", repr=False)

    def fingerprint(self) -> str:
        """A keyed hash of the credential: equal only for the very same credential."""
        message = self.method.encode() + b"\0" + self.material
        # hmac.digest: the one-shot C path; a look keys the cache with it twice.
        return hmac.digest(_FINGERPRINT_KEY, message, "sha256").hex()


def secret_credentials(
    *, token_endpoint: str, client_id: str, client_secret: str, source: str
) -> ClientCredentials:
    """An identity proven by a client secret (registered with the log redactor while held)."""
    credentials = ClientCredentials(
        token_endpoint=token_endpoint,
        client_id=client_id,
        source=source,
        method=CLIENT_SECRET,
        material=client_secret.encode(),
        client_secret=client_secret,
        seal_secret=client_secret,
    )
    REDACTOR.register(client_secret, holder=credentials)
    return credentials


def private_key_credentials(
    *, token_endpoint: str, client_id: str, jwk: str, source: str
) -> ClientCredentials:
    """An identity proven by private_key_jwt; a JWK that is not usable is CredentialsInvalid."""
    REDACTOR.register(jwk)
    for member in private_members(jwk):
        REDACTOR.register(member)
    try:
        key = parse_private_jwk(jwk)
    except InvalidKeyError as error:
        raise CredentialsError(
            f"Credentials {source}: {JWK_KEY} is not a usable private RSA key: {error}; write"
            " the application's private key as a JWK (kty RSA with its private members and a"
            " kid)",
            reason=CREDENTIALS_INVALID,
        ) from None

    def assertion() -> str:
        signed = key.sign(client_id=client_id, audience=token_endpoint, now=datetime.now(UTC))
        REDACTOR.register(signed)
        return signed

    credentials = ClientCredentials(
        token_endpoint=token_endpoint,
        client_id=client_id,
        source=source,
        method=PRIVATE_KEY_JWT,
        material=key.material,
        client_assertion=assertion,
        seal_secret=key.seal_secret(),
    )
    # Registered above already (the parse may echo it); now for as long as it is held.
    for value in (jwk, *private_members(jwk)):
        REDACTOR.register(value, holder=credentials)
    return credentials


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """An allow-list entry as (host, port or None); ValueError when it is not one."""
    text = entry.strip().lower()
    if not text or "/" in text or "@" in text:
        raise ValueError(f"{entry!r} is not a host name")
    parts = urlsplit("//" + text)
    host = (parts.hostname or "").rstrip(".")
    if not host or host == "*." or ("*" in host and not host.startswith("*.")):
        raise ValueError(f"{entry!r} is not a host name")
    return host, parts.port


def _host_allowed(host: str, port: int, entry: str) -> bool:
    try:
        allowed_host, allowed_port = parse_host_entry(entry)
    except ValueError:
        return False  # Settings rejects such entries; a hand-made policy just never matches
    if allowed_port is not None and allowed_port != port:
        return False
    if allowed_host.startswith("*."):
        return host.endswith(allowed_host[1:])
    return host == allowed_host


# Every look checks its endpoint; a cluster has a handful of them. Failures raise and
# are not cached.
@functools.lru_cache(maxsize=256)
def _split_endpoint(url: str) -> tuple[SplitResult, str, int | None]:
    """Parse a token endpoint URL or raise ValueError saying what is wrong with it."""
    if not url or any(character.isspace() or not character.isprintable() for character in url):
        raise ValueError("it is empty or contains spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise ValueError("it must be an https:// URL")
    if not parts.hostname:
        raise ValueError("it has no host name")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("it must not contain a user name or password")
    # Only what a DNS name, an IP address and a port are made of: parsers disagree on
    # anything else (urllib3 reads "https://evil.example\\.allowed.com" as host
    # evil.example), and the host checked must be the host the request goes to.
    if not _NETLOC.fullmatch(parts.netloc):
        raise ValueError("its host may only contain letters, digits, '.', '-' and a port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("its port is not a number from 1 to 65535") from None
    host = parts.hostname.rstrip(".").lower()
    sent_to = (urllib3.util.parse_url(url).host or "").strip("[]").rstrip(".").lower()
    if sent_to != host:
        raise ValueError("its host is ambiguous")
    return parts, host, port


def check_endpoint_url(url: str, *, allow_insecure_http: bool) -> None:
    """Well-formed and, unless allowed, https: raises CredentialsError(CredentialsInvalid)."""
    try:
        parts, _, _ = _split_endpoint(url)
    except ValueError as error:
        raise CredentialsError(
            f"Token endpoint is not a usable URL: {error}", reason=CREDENTIALS_INVALID
        ) from None
    if parts.scheme == "http" and not allow_insecure_http:
        raise CredentialsError(
            f"Token endpoint {parts.scheme}://{parts.netloc} uses plain http, which would send the"
            " client secret unencrypted: use https (M2M_ALLOW_INSECURE_HTTP_ENDPOINTS=true"
            " allows http, for local development only)",
            reason=CREDENTIALS_INVALID,
        )


@dataclass(frozen=True)
class EndpointPolicy:
    """Which token endpoints a credentials Secret may send its client secret to.

    Entries are host names ("login.microsoftonline.com"), optionally with a port
    ("127.0.0.1:8443", then only that port) or a leading wildcard label
    ("*.ciamlogin.com", any host below that domain).
    """

    allowed_hosts: frozenset[str]
    allow_insecure_http: bool

    def check(self, url: str) -> None:
        try:
            parts, host, port = _split_endpoint(url)
        except ValueError as error:
            raise CredentialsError(
                f"Token endpoint is not allowed: {error}", reason=ENDPOINT_NOT_ALLOWED
            ) from None
        shown = f"{parts.scheme}://{parts.netloc}"
        if parts.scheme == "http" and not self.allow_insecure_http:
            raise CredentialsError(
                f"Token endpoint {shown} uses plain http, which would send the client secret"
                " unencrypted: use https",
                reason=ENDPOINT_NOT_ALLOWED,
            )
        effective_port = port if port is not None else (443 if parts.scheme == "https" else 80)
        if not any(_host_allowed(host, effective_port, entry) for entry in self.allowed_hosts):
            allowed_text = ", ".join(sorted(self.allowed_hosts)) or "(none)"
            raise CredentialsError(
                f"Token endpoint host {host!r} is not in the operator's allowed token endpoint"
                f" hosts ({allowed_text}): use an allowed endpoint, or ask the operator's"
                " administrator to add the host to M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS",
                reason=ENDPOINT_NOT_ALLOWED,
            )


def _inner(error: Exception) -> str:
    """An error's message continuing another sentence."""
    text = str(error)
    return text[:1].lower() + text[1:]


def _read_file(directory: Path, key: str) -> str | None:
    try:
        return (directory / key).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise CredentialsError(
            f"Cannot read {key} from {directory}: {type(error).__name__}",
            reason=CREDENTIALS_INVALID,
        ) from None


def operator_identity(
    credentials_dir: Path | None,
    environ: Mapping[str, str] | None = None,
    *,
    allow_insecure_http: bool,
    reuse: ClientCredentials | None = None,
) -> ClientCredentials:
    """The operator's own identity, read afresh on every call.

    Each key comes from a file in `credentials_dir` (M2M_CREDENTIALS_DIR) when there
    is one (a mounted Secret, updated in place when the identity is rotated), else
    from the environment variable of the same name. `allow_insecure_http`:
    M2M_ALLOW_INSECURE_HTTP_ENDPOINTS. `reuse`: the identity an earlier call returned,
    returned again while every value read is the same (a new one costs its
    fingerprint and its registration with the log redactor, at every look).
    """
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    missing: list[str] = []
    for key in KEYS:
        raw = _read_file(credentials_dir, key) if credentials_dir else None
        if raw is None:
            raw = env.get(key)
        # Files made with `kubectl create secret --from-file` usually end in a newline.
        value = (raw or "").strip()
        if value:
            values[key] = value
        else:
            missing.append(key)
    if missing:
        where = "the environment"
        if credentials_dir:
            where = f"{credentials_dir} or the environment"
        raise CredentialsError(
            f"The operator's own identity is incomplete: {', '.join(missing)} not set in {where};"
            " set them, or name a credentials Secret in spec.credentials.secretRef",
            reason=CREDENTIALS_MISSING,
        )
    try:
        check_endpoint_url(values[TOKEN_ENDPOINT_KEY], allow_insecure_http=allow_insecure_http)
    except CredentialsError as error:
        raise CredentialsError(
            f"The operator's own identity: {_inner(error)}", reason=error.reason
        ) from None
    if (
        reuse is not None
        and reuse.source == OPERATOR_IDENTITY
        and reuse.method == CLIENT_SECRET
        and reuse.token_endpoint == values[TOKEN_ENDPOINT_KEY]
        and reuse.client_id == values[CLIENT_ID_KEY]
        and reuse.client_secret == values[CLIENT_SECRET_KEY]
    ):
        return reuse
    return secret_credentials(
        token_endpoint=values[TOKEN_ENDPOINT_KEY],
        client_id=values[CLIENT_ID_KEY],
        client_secret=values[CLIENT_SECRET_KEY],
        source=OPERATOR_IDENTITY,
    )


def operator_token_endpoint(
    credentials_dir: Path | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The operator's own token endpoint alone (None when unset), read afresh like the rest."""
    env = os.environ if environ is None else environ
    raw = None
    if credentials_dir:
        raw = _read_file(credentials_dir, TOKEN_ENDPOINT_KEY)
    if raw is None:
        raw = env.get(TOKEN_ENDPOINT_KEY)
    return (raw or "").strip() or None


def credentials_from_secret(
    data: Mapping[str, str] | None, *, namespace: str, name: str, policy: EndpointPolicy
) -> ClientCredentials:
    """An identity from a credentials Secret's `.data` (None: the Secret does not exist).

    It holds AZURE_APP_CLIENT_ID, AZURE_OPENID_CONFIG_TOKEN_ENDPOINT and a proof:
    AZURE_APP_JWK (private_key_jwt, preferred) or AZURE_APP_CLIENT_SECRET.
    """
    source = f"Secret {namespace}/{name}"
    expected = (
        f"it must hold {', '.join(SECRET_REQUIRED_KEYS)} and {JWK_KEY} or {CLIENT_SECRET_KEY}"
    )
    if data is None:
        raise CredentialsError(
            f"Credentials {source} not found: create it; {expected}",
            reason=CREDENTIALS_MISSING,
        )
    values: dict[str, str] = {}
    for key in (*SECRET_REQUIRED_KEYS, *SECRET_PROOF_KEYS):
        encoded = data.get(key)
        if encoded is None:
            continue
        try:
            if not isinstance(encoded, str):
                raise TypeError
            value = base64.b64decode(encoded, validate=True).decode("utf-8").strip()
        except (TypeError, ValueError, binascii.Error):
            raise CredentialsError(
                f"Credentials {source}: the value of {key} is not valid base64-encoded UTF-8"
                " text; write it with `kubectl create secret generic` or as stringData",
                reason=CREDENTIALS_INVALID,
            ) from None
        if value:
            values[key] = value
    missing = [key for key in SECRET_REQUIRED_KEYS if key not in values]
    if not any(key in values for key in SECRET_PROOF_KEYS):
        missing.append(f"{JWK_KEY} or {CLIENT_SECRET_KEY}")
    if missing:
        raise CredentialsError(
            f"Credentials {source} lacks a value for {', '.join(missing)}: {expected}",
            reason=CREDENTIALS_MISSING,
        )
    endpoint = values[TOKEN_ENDPOINT_KEY]
    try:
        check_endpoint_url(endpoint, allow_insecure_http=True)  # malformed: CredentialsInvalid
        policy.check(endpoint)
    except CredentialsError as error:
        raise CredentialsError(
            f"Credentials {source}: {_inner(error)}", reason=error.reason
        ) from None
    if JWK_KEY in values:
        return private_key_credentials(
            token_endpoint=endpoint,
            client_id=values[CLIENT_ID_KEY],
            jwk=values[JWK_KEY],
            source=source,
        )
    return secret_credentials(
        token_endpoint=endpoint,
        client_id=values[CLIENT_ID_KEY],
        client_secret=values[CLIENT_SECRET_KEY],
        source=source,
    )
