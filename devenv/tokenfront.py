"""A token endpoint that checks client assertions the way Microsoft Entra ID does.

mock-oauth2-server issues tokens for any client and does not verify a
`client_assertion` at all: a test of `private_key_jwt` or of workload identity
federation against it alone would pass with a forged assertion. This front
listens on 127.0.0.1, in front of mock-oauth2-server, and verifies what Entra
verifies before it lets a request through:

- a client registered with a public JWK (`register_jwk`): the assertion is an
  RS256 JWT signed by the matching private key, `aud` = this token endpoint's
  URL, `iss` = `sub` = the client id, `exp` - `nbf` (or `iat`) at most 10
  minutes, not expired, and a `jti` never seen before;
- a client registered as federated (`register_federated`): the assertion is a
  JWT signed by a key of the issuer's JWKS (here: the API server's own
  `/openid/v1/jwks`, fetched on demand), with that `iss`, the registered `sub`
  (`system:serviceaccount:<namespace>:<name>`) and `aud`, not expired;
- a client registered with a secret (`register_secret`): `client_secret` must
  match (else AADSTS7000215, as Entra answers a wrong secret);
- any other client: passed through unchanged, as before (its assertions
  unverified, unless `strict`, which rejects them as Entra does: AADSTS700016).

A verified assertion becomes a client-credentials request with a dummy secret
to mock-oauth2-server, whose answer is returned as it is. A rejected one gets
Entra's answer: HTTP 401 `invalid_client` with an `AADSTS...` description and
`error_codes`. Every other path (discovery, JWKS) is proxied unchanged.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode

import jwt
import requests

__all__ = [
    "ASSERTION_TYPE",
    "FEDERATION_AUDIENCE",
    "MAX_ASSERTION_LIFETIME",
    "FrontRequest",
    "VerifyingFront",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATION_AUDIENCE = "api://AzureADTokenExchange"
MAX_ASSERTION_LIFETIME = 600  # seconds between nbf (or iat) and exp, as Entra allows
# Entra's own error codes for what is checked here.
AADSTS_WRONG_SECRET = 7000215
AADSTS_ASSERTION_INVALID = 700027
AADSTS_NO_FEDERATED_MATCH = 70021
AADSTS_UNKNOWN_CLIENT = 700016
# The secret forwarded to mock-oauth2-server for a verified assertion (it wants one).
_FORWARDED_SECRET = "verified-by-the-front"
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
)

JwksSource = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class _Federated:
    issuer: str
    subject: str
    audience: str
    jwks: JwksSource


@dataclass(frozen=True)
class FrontRequest:
    """One token request as the front saw it: for tests to count and inspect."""

    client_id: str
    method: str  # "client_assertion" | "client_secret" | "none"
    accepted: bool
    error_code: int | None
    description: str = field(default="")


class _Rejected(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


class VerifyingFront:
    """The HTTP server on 127.0.0.1 in front of `upstream` (mock-oauth2-server's base URL)."""

    def __init__(
        self, upstream: str, *, strict: bool = False, clock: Callable[[], float] = time.time
    ) -> None:
        self.upstream = upstream.rstrip("/")
        # strict: an assertion of a client registered with neither a JWK nor a federated
        # credential is rejected (AADSTS700016), as Entra does. Not strict (the default):
        # it goes upstream unverified, as it did before this front existed.
        self.strict = strict
        self._clock = clock
        self._lock = threading.Lock()
        self._jwks: dict[str, dict[str, Any]] = {}
        self._federated: dict[str, _Federated] = {}
        self._secrets: dict[str, str] = {}
        self._seen_jti: set[str] = set()
        self._requests: list[FrontRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- registration (what an app registration in Entra holds) --

    def register_jwk(self, client_id: str, public_jwk: Mapping[str, Any]) -> None:
        """The client authenticates with private_key_jwt, signed by this key's private half."""
        key = {k: v for k, v in public_jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
        with self._lock:
            self._jwks[client_id] = key

    def register_federated(
        self,
        client_id: str,
        *,
        subject: str,
        issuer: str,
        jwks: JwksSource,
        audience: str = FEDERATION_AUDIENCE,
    ) -> None:
        """A federated credential: tokens of `issuer` for `subject` and `audience` count."""
        with self._lock:
            self._federated[client_id] = _Federated(issuer, subject, audience, jwks)

    def register_secret(self, client_id: str, secret: str) -> None:
        """Only this secret is accepted for the client (others get AADSTS7000215)."""
        with self._lock:
            self._secrets[client_id] = secret

    def unregister(self, client_id: str) -> None:
        with self._lock:
            self._jwks.pop(client_id, None)
            self._federated.pop(client_id, None)
            self._secrets.pop(client_id, None)

    @property
    def requests(self) -> list[FrontRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, client_id: str) -> list[FrontRequest]:
        return [request for request in self.requests if request.client_id == client_id]

    # -- lifecycle --

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the verifying front is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        front = self

        class Handler(_Handler):
            owner = front

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="token-front", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- the checks --

    def check(self, form: Mapping[str, str], *, endpoint_url: str) -> tuple[str, bool]:
        """Verify a token request's client authentication; (method, needs a dummy secret).

        Raises _Rejected with Entra's code and description when it fails.
        """
        client_id = form.get("client_id", "")
        assertion = form.get("client_assertion")
        with self._lock:
            public_jwk = self._jwks.get(client_id)
            federated = self._federated.get(client_id)
            secret = self._secrets.get(client_id)
        if assertion is not None:
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                raise _Rejected(
                    AADSTS_ASSERTION_INVALID,
                    f"client_assertion_type must be {ASSERTION_TYPE}",
                )
            if public_jwk is not None:
                self._check_private_key_jwt(client_id, assertion, public_jwk, endpoint_url)
            elif federated is not None:
                self._check_federated(client_id, assertion, federated)
            elif self.strict:
                raise _Rejected(
                    AADSTS_UNKNOWN_CLIENT,
                    f"Application with identifier '{client_id}' has no certificate or federated"
                    " credential registered for client assertions",
                )
            else:
                return "client_assertion (unverified)", False  # as mock-oauth2-server had it
            return "client_assertion", True
        if "client_secret" in form:
            if secret is not None and form["client_secret"] != secret:
                raise _Rejected(
                    AADSTS_WRONG_SECRET,
                    f"Invalid client secret provided for app '{client_id}'. Ensure the secret"
                    " being sent in the request is the client secret value, not the ID",
                )
            return "client_secret", False
        return "none", False

    def _check_private_key_jwt(
        self, client_id: str, assertion: str, public_jwk: Mapping[str, Any], endpoint_url: str
    ) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
            key = jwt.PyJWK(dict(public_jwk), algorithm="RS256")
            claims = jwt.decode(
                assertion,
                key=key,
                algorithms=["RS256"],
                audience=endpoint_url,
                issuer=client_id,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
                leeway=0,
            )
        except jwt.PyJWTError as error:
            raise _Rejected(
                AADSTS_ASSERTION_INVALID,
                f"Client assertion failed validation ({type(error).__name__}: {error})",
            ) from None
        if header.get("alg") != "RS256":
            raise _Rejected(AADSTS_ASSERTION_INVALID, "Client assertion must be signed RS256")
        if claims.get("sub") != client_id:
            raise _Rejected(
                AADSTS_ASSERTION_INVALID,
                f"Client assertion sub {claims.get('sub')!r} is not the client id",
            )
        start = claims.get("nbf", claims.get("iat"))
        if not isinstance(start, int | float):
            raise _Rejected(AADSTS_ASSERTION_INVALID, "Client assertion has no nbf or iat")
        if claims["exp"] - start > MAX_ASSERTION_LIFETIME:
            raise _Rejected(
                AADSTS_ASSERTION_INVALID,
                f"Client assertion lifetime {claims['exp'] - start}s exceeds"
                f" {MAX_ASSERTION_LIFETIME}s",
            )
        with self._lock:
            jti = f"{client_id}\n{claims['jti']}"
            if jti in self._seen_jti:
                raise _Rejected(
                    AADSTS_ASSERTION_INVALID, "Client assertion jti was already used (replay)"
                )
            self._seen_jti.add(jti)

    def _check_federated(self, client_id: str, assertion: str, federated: _Federated) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
            keys = jwt.PyJWKSet.from_dict(dict(federated.jwks()))
            kid = header.get("kid")
            matching = [key for key in keys.keys if kid is None or key.key_id == kid]
            if not matching:
                raise _Rejected(
                    AADSTS_ASSERTION_INVALID,
                    f"Client assertion key {kid!r} is not in the issuer's JWKS",
                )
            claims = jwt.decode(
                assertion,
                key=matching[0],
                algorithms=["RS256", "ES256", "PS256"],
                audience=federated.audience,
                issuer=federated.issuer,
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as error:
            raise _Rejected(
                AADSTS_ASSERTION_INVALID,
                f"Client assertion failed validation ({type(error).__name__}: {error})",
            ) from None
        if claims.get("sub") != federated.subject:
            raise _Rejected(
                AADSTS_NO_FEDERATED_MATCH,
                "No matching federated identity record found for presented assertion."
                f" Assertion Issuer: '{claims.get('iss')}'."
                f" Assertion Subject: '{claims.get('sub')}'."
                f" Assertion Audience: '{federated.audience}'.",
            )

    def record(self, entry: FrontRequest) -> None:
        with self._lock:
            self._requests.append(entry)


def entra_error(code: int, description: str) -> dict[str, Any]:
    """Entra ID's error body for a rejected client."""
    return {
        "error": "invalid_client",
        "error_description": f"AADSTS{code}: {description}"
        f" Trace ID: {uuid.uuid4()} Correlation ID: {uuid.uuid4()}",
        "error_codes": [code],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "trace_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
    }


class _Handler(BaseHTTPRequestHandler):
    owner: VerifyingFront
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: the tests read the front's records instead

    def do_GET(self) -> None:
        self._proxy(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if not self.path.split("?", 1)[0].endswith("/token"):
            self._proxy(body)
            return
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        form = {name: values[0] for name, values in parsed.items()}
        client_id = form.get("client_id", "")
        endpoint_url = f"http://{self.headers.get('Host', '')}{self.path.split('?', 1)[0]}"
        front = self.owner
        try:
            method, dummy_secret = front.check(form, endpoint_url=endpoint_url)
        except _Rejected as rejected:
            method = "client_assertion" if "client_assertion" in form else "client_secret"
            entry = FrontRequest(client_id, method, False, rejected.code, rejected.description)
            front.record(entry)
            self._send(401, json.dumps(entra_error(rejected.code, rejected.description)).encode())
            return
        except Exception as error:  # a broken check (e.g. the JWKS unreachable): say so
            problem = {"error": "server_error", "error_description": f"front: {error!r}"}
            front.record(FrontRequest(client_id, "client_assertion", False, None, repr(error)))
            self._send(500, json.dumps(problem).encode())
            return
        front.record(FrontRequest(client_id, method, True, None))
        if dummy_secret:
            form.pop("client_assertion", None)
            form.pop("client_assertion_type", None)
            form["client_secret"] = _FORWARDED_SECRET
            body = urlencode(form).encode()
        self._proxy(body)

    def _proxy(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            response = requests.request(
                self.command,
                self.owner.upstream + self.path,
                data=body or None,
                headers=headers,  # Host too: mock-oauth2-server names its issuer after it
                timeout=30,
                allow_redirects=False,
            )
        except requests.RequestException as error:
            self._send(502, json.dumps({"error": "bad_gateway", "detail": str(error)}).encode())
            return
        self._send(
            response.status_code,
            response.content,
            content_type=response.headers.get("Content-Type", "application/json"),
            extra={
                k: v
                for k, v in response.headers.items()
                if k.lower() not in _HOP_HEADERS and k.lower() != "content-type"
            },
        )

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
