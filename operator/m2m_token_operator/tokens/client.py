"""One OAuth 2.0 client-credentials token request on the wire, and what its answer means.

The request is exactly what the contract says: a form-encoded POST of
`client_id`, `grant_type=client_credentials`, `scope` and the proof: either
`client_secret`, or `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
with a `client_assertion` made afresh for this request (a JWT signed with the
application's private key, or a minted ServiceAccount token); never both.
Redirects are never followed: a 307/308 would resend the client secret to
whatever address the answer names. Proxies and CA bundles come from the
environment (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else
certifi's bundle, as `requests` had it); certificates are always verified.

The request runs on the event loop (aiohttp): on a worker thread with `requests`,
a token request cost the operator five times the CPU, and a burst of new scopes
fought the event loop for the GIL. Only making a client assertion, which may
block (a ServiceAccount token is minted with a blocking call), runs on a thread.

Every failure is a `TokenEndpointError` whose class is the status condition's
reason and says whether retrying can help. The mapping follows RFC 6749 §5.2
and Microsoft's guidance for daemon apps (retry 429 after Retry-After, retry
5xx with backoff, never retry other 4xx in a loop), checked in this order:

| answer                                                      | class               | permanent |
| ----------------------------------------------------------- | ------------------- | --------- |
| connection refused/reset, DNS, TLS, proxy, timeout          | EndpointUnavailable | no        |
| 3xx (redirect, not followed)                                | EndpointUnavailable | no        |
| 429, or AADSTS50196 (request loop)                          | Throttled           | no        |
| 5xx, 408, `temporarily_unavailable`, `server_error`,        | EndpointUnavailable | no        |
|   AADSTS90033 (transient)                                   |                     |           |
| `invalid_scope`, `invalid_resource`, AADSTS70011, 500011,   | ScopeRejected       | yes       |
|   28002, 28003, 50001, 650057                               |                     |           |
| `invalid_client`, `unauthorized_client`, `invalid_grant`,   | CredentialsRejected | yes       |
|   401, AADSTS7000215, 7000222, 7000218, 700016, 7000112,    |                     |           |
|   90002, 900023, 53003                                      |                     |           |
| any other 4xx (`invalid_request`, 403, 404, ...)            | CredentialsRejected | yes       |
| 200 without a usable access_token/expires_in, non-JSON body | EndpointUnavailable | no        |
|   (expires_in under 1s, numbers too large, nesting too deep) |                     |           |
| any other status                                            | EndpointUnavailable | no        |

AADSTS700016 ("application not found in the directory") names the *client*
application, so it is a credentials problem, not a scope problem. Any other 4xx
means the identity's configuration (its endpoint URL, tenant or grant) is
wrong, which only a person can fix: it is held like a rejected credential.

Messages say what happened and what to do, carry the endpoint's error code,
AADSTS codes, trace and correlation ids, and are scrubbed: the client secret
is removed from any text the endpoint sends back, and no token is ever quoted.
The client id is named only when it cannot be a secret (see `client_id_shown`);
otherwise it is withheld, and scrubbed from echoed texts like the secret.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import json
import logging
import math
import os
import platform
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlencode, urlsplit, urlunsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
import certifi

from m2m_token_operator import __version__
from m2m_token_operator.tokens.assertion import JWT_BEARER
from m2m_token_operator.tokens.credentials import (
    CLIENT_SECRET,
    FEDERATED,
    PRIVATE_KEY_JWT,
    ClientCredentials,
)
from m2m_token_operator.tokens.model import (
    AccessToken,
    CredentialsRejected,
    EndpointUnavailable,
    ScopeRejected,
    Throttled,
    TokenEndpointError,
    utc_now,
)
from m2m_token_operator.tokens.redaction import REDACTOR

logger = logging.getLogger(__name__)

# Tokens are a few kilobytes; a larger answer is not a token endpoint talking.
MAX_RESPONSE_BYTES = 1 << 20
# Longer than any real token lifetime, short enough to keep datetimes finite.
MAX_EXPIRES_IN = 10 * 366 * 24 * 3600
_DESCRIPTION_LIMIT = 300
REDACTED = "[REDACTED]"

SCOPE_ERRORS = frozenset({"invalid_scope", "invalid_resource"})
SCOPE_CODES = frozenset({70011, 500011, 28002, 28003, 50001, 650057})
CREDENTIALS_ERRORS = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})
CREDENTIALS_CODES = frozenset({7000215, 7000222, 7000218, 700016, 7000112, 90002, 900023, 53003})
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
TRANSIENT_CODES = frozenset({90033})
THROTTLE_CODES = frozenset({50196})

# A client id is shown in messages (status, events, logs) only when it cannot be a client
# secret that a user put into AZURE_APP_CLIENT_ID by swapping the two keys:
# - a GUID, which is what every Entra client id is, or
# - a short, low-entropy name of lowercase letters, digits and hyphens starting with a
#   letter (dev and test identities such as "client-1" or "e2e-app"). Entra client
#   secrets always hold upper-case letters and '~' or '.', so they never match.
# Any other client id is withheld and scrubbed from every text the endpoint echoes
# (Entra quotes it back: "Application with identifier '...' was not found").
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_PLAIN_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
_CLIENT_ID_WITHHELD = "<not a GUID, not shown>"


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Retry-After as seconds from `now`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # HTTP-dates are GMT by definition
    return max(0.0, (moment - now).total_seconds())


def client_id_shown(client_id: str) -> bool:
    """Whether a client id is safe to name in messages: a GUID or a plain short name."""
    # fullmatch, not `$`: `$` would also accept a trailing newline.
    return bool(_GUID.fullmatch(client_id) or _PLAIN_NAME.fullmatch(client_id))


def _scrubber(*secrets: str) -> Callable[[str], str]:
    # A proxy or endpoint may echo the form body back, raw or URL-encoded.
    # Made at the first scrub: only answers other than a token are scrubbed, and every
    # token request would otherwise pay for encoding its secrets twice.
    @functools.cache
    def forms() -> list[str]:
        variants = {
            form
            for secret in secrets
            for form in (secret, quote_plus(secret), quote(secret, safe=""))
            if form
        }
        # Longest first, so a form containing another is replaced whole.
        return sorted(variants, key=len, reverse=True)

    def scrub(text: str) -> str:
        for form in forms():
            text = text.replace(form, REDACTED)
        return "".join(c if c.isprintable() else " " for c in text)

    return scrub


def _seconds(value: object) -> float | None:
    """A positive number of seconds from a JSON number or numeric string, else None.

    Raises OverflowError for an integer too large to be a float (a 400-digit number).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or number <= 0 or number > MAX_EXPIRES_IN:
        return None
    return number


def _shown_url(url: str) -> str:
    """An address fit for a message: scheme, host and path; never a query or user info."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _cause(error: BaseException) -> str:
    """The root cause of a connection error in a few words, without object reprs."""
    os_error = getattr(error, "os_error", None)  # aiohttp's ClientConnectorError
    if isinstance(os_error, OSError) and not isinstance(os_error, ssl.SSLError):
        if isinstance(os_error.errno, int) and os_error.errno > 0:
            # asyncio's strerror ("Connect call failed (...)") does not say why; the errno does.
            return f"[Errno {os_error.errno}] {os.strerror(os_error.errno)}"
        if os_error.errno is not None:  # a resolver error (negative): its own text
            return f"[Errno {os_error.errno}] {os_error.strerror or type(os_error).__name__}"
        return type(os_error).__name__
    text = str(error)
    for pattern in (r"\[SSL: [A-Z_]+\][^'\")]*", r"\[Errno -?\d+\] [^'\")]*"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip()
    return type(error).__name__


def _codes(value: object) -> tuple[int, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(code for code in value if isinstance(code, int) and not isinstance(code, bool))


_RETRIED = "The request is retried with backoff"
_REDIRECT_ADVICE = (
    "Redirects are not followed, since that would send the client secret to another address:"
    " set AZURE_OPENID_CONFIG_TOKEN_ENDPOINT to the final token endpoint URL"
)
_THROTTLE_ADVICE = "The request is retried later, not before the time the endpoint asked for"
_SCOPE_ADVICE = (
    "Check that the target application exists in this tenant and exposes exactly this"
    " application ID URI, and that spec.target or spec.scope names it"
)
_CREDENTIALS_ADVICE = (
    "Check AZURE_APP_CLIENT_ID and AZURE_APP_CLIENT_SECRET (an expired or rotated client"
    " secret must be replaced) and that AZURE_OPENID_CONFIG_TOKEN_ENDPOINT names the right tenant"
)
# A rejected assertion has other causes than a rejected secret.
_METHOD_ADVICE = {
    PRIVATE_KEY_JWT: (
        "Check AZURE_APP_CLIENT_ID, that AZURE_APP_JWK is a key registered for this application"
        " (its kid/x5t must match a certificate of the app registration), and that"
        " AZURE_OPENID_CONFIG_TOKEN_ENDPOINT names the right tenant"
    ),
    FEDERATED: (
        "Check the ServiceAccount's azure.workload.identity/client-id, and that the"
        " application has a federated credential for this cluster's service account issuer,"
        " the subject system:serviceaccount:<namespace>:<name> and the audience the operator"
        " uses (M2M_FEDERATION_AUDIENCE)"
    ),
}
_REFUSED_ADVICE = (
    "Check that AZURE_OPENID_CONFIG_TOKEN_ENDPOINT is the tenant's OAuth 2.0 token endpoint"
    " (…/oauth2/v2.0/token) and that the client may use the client-credentials grant"
)


def _classify(
    *, status: int, error: str | None, codes: Iterable[int]
) -> tuple[type[TokenEndpointError], str, str]:
    """The error class for an answer, what happened (a template), and what to do."""
    code_set = set(codes)
    failed = "The token endpoint {shown} failed"
    if 300 <= status < 400:
        what = "The token endpoint {shown} redirects to {location}"
        return EndpointUnavailable, what, _REDIRECT_ADVICE
    if status == 429 or code_set & THROTTLE_CODES:
        return Throttled, "The token endpoint {shown} is throttling requests", _THROTTLE_ADVICE
    if status >= 500 or status == 408 or error in TRANSIENT_ERRORS or code_set & TRANSIENT_CODES:
        return EndpointUnavailable, failed, _RETRIED
    if code_set & SCOPE_CODES or error in SCOPE_ERRORS:
        what = "The token endpoint {shown} rejected the scope {scope} for {who}"
        return ScopeRejected, what, _SCOPE_ADVICE
    if code_set & CREDENTIALS_CODES or error in CREDENTIALS_ERRORS or status == 401:
        what = "The token endpoint {shown} rejected the credentials of {who}"
        return CredentialsRejected, what, _CREDENTIALS_ADVICE
    if 400 <= status < 500:
        what = "The token endpoint {shown} refused the request of {who}"
        return CredentialsRejected, what, _REFUSED_ADVICE
    return EndpointUnavailable, failed, _RETRIED


@dataclass(frozen=True, slots=True)
class _Exchange:
    """One token request: what is sent, and what its messages say."""

    endpoint: str
    body: bytes  # the form, encoded
    issued_at: datetime
    scope: str
    shown: str  # the endpoint as messages name it
    who: str  # the identity as messages name it
    scrub: Callable[[str], str]
    method: str


def environment_proxy(url: str) -> tuple[str | None, dict[str, str]]:
    """The proxy for `url` from the environment (HTTP(S)_PROXY and NO_PROXY, as urllib
    reads them), and its credentials taken out of its URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    where = f"{host}:{parts.port}" if parts.port else host
    proxy = getproxies().get(parts.scheme)
    if not proxy or proxy_bypass(where):
        return None, {}
    if "://" not in proxy:
        proxy = f"http://{proxy}"  # "proxy:3128", as curl and requests read it
    proxy_parts = urlsplit(proxy)
    if proxy_parts.username is None:
        return proxy, {}
    pair = f"{unquote(proxy_parts.username)}:{unquote(proxy_parts.password or '')}"
    try:
        raw = pair.encode("latin-1")  # as requests and aiohttp encode Basic credentials
    except UnicodeEncodeError:
        raw = pair.encode()
    headers = {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}
    address = proxy_parts.netloc.rpartition("@")[2]
    return urlunsplit(proxy_parts._replace(netloc=address)), headers


def ca_bundle() -> str:
    """The CA bundle that verifies token endpoints, chosen as `requests` chooses it."""
    environ = os.environ
    return environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE") or certifi.where()


_USER_AGENT = (
    f"m2m-token-operator/{__version__} aiohttp/{aiohttp.__version__}"
    f" {platform.python_implementation()}/{platform.python_version()}"
)
_FORM_HEADERS = {
    "Accept": "application/json",
    "Content-Type": "application/x-www-form-urlencoded",
}


class TokenClient:
    """Requests tokens over HTTP(S) on the event loop.

    The session is created on the first request, on the loop that makes it (a
    session belongs to one loop); `aclose` releases it. The environment (proxies,
    CA bundle) is read when the client is built: a pod's environment is fixed.
    The proxy for an origin is chosen once (`_request_options`); origins are few, the
    allow-listed token endpoints.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        clock: Callable[[], datetime] = utc_now,
        pool_size: int = 10,
        deadline: float | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self.pool_size = pool_size  # connections per endpoint host
        # A total for the whole exchange: a drip-feeding endpoint never trips a read timeout.
        self._deadline = deadline
        self._clock = clock
        # Built now, so that an unreadable CA bundle fails at start, not at the first token.
        bundle = ca_bundle()
        if os.path.isdir(bundle):  # a directory of hashed certificates, as c_rehash makes
            self._ssl = ssl.create_default_context(capath=bundle)
        else:
            self._ssl = ssl.create_default_context(cafile=bundle)
        # Read once per origin, not per request (aiohttp's trust_env: per request, on a thread).
        self._options_by_origin: dict[tuple[str, str], dict[str, Any]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        # Making a client assertion may block (minting a ServiceAccount token).
        self._assertions = ThreadPoolExecutor(max_workers=4, thread_name_prefix="m2m-assertion")

    def _session_here(self) -> aiohttp.ClientSession:
        if self.closed:  # no new session (and connections) once the operator stops
            raise EndpointUnavailable("The token client is closed: the operator is stopping")
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._session_loop is not loop:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.pool_size, ssl=self._ssl)
            session = aiohttp.ClientSession(
                connector=connector,
                # Cookies set for one identity must not ride along with another's request.
                cookie_jar=aiohttp.DummyCookieJar(),
                # No netrc: no credentials but the form's go to a token endpoint. Proxies
                # come from `_request_options`.
                trust_env=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
                ),
                headers={"User-Agent": _USER_AGENT},
            )
            self._session = session
            self._session_loop = loop
        return session

    def _request_options(self, endpoint: str) -> dict[str, Any]:
        """The headers, and the proxy with its headers, for `endpoint`; once per origin."""
        parts = urlsplit(endpoint)
        origin = (parts.scheme, parts.netloc)
        options = self._options_by_origin.get(origin)
        if options is None:
            proxy, proxy_headers = environment_proxy(endpoint)
            options = {"headers": _FORM_HEADERS}
            if proxy is not None:
                options["proxy"] = proxy
            if proxy_headers and parts.scheme == "https":
                options["proxy_headers"] = proxy_headers  # sent with the CONNECT
            elif proxy_headers:
                # Plain http goes to the proxy itself (no CONNECT): the request carries them.
                options["headers"] = {**_FORM_HEADERS, **proxy_headers}
            self._options_by_origin[origin] = options
        return options

    async def aclose(self) -> None:
        self.closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
        self._assertions.shutdown(wait=False, cancel_futures=True)

    async def fetch(self, credentials: ClientCredentials, scope: str) -> AccessToken:
        """Request a token now; raises a `TokenEndpointError` subclass on failure."""
        client_id = credentials.client_id
        form = {
            "client_id": credentials.client_id,
            "grant_type": "client_credentials",
            "scope": scope,
        }
        if credentials.client_assertion is not None:
            loop = asyncio.get_running_loop()
            proof = await loop.run_in_executor(self._assertions, credentials.client_assertion)
            REDACTOR.register(proof)
            form["client_assertion_type"] = JWT_BEARER
            form["client_assertion"] = proof
        else:
            proof = credentials.client_secret or ""
            form["client_secret"] = proof
        if client_id_shown(client_id):
            scrub = _scrubber(proof)
            who = f"{credentials.source} (client id {client_id})"
        else:
            # Possibly a secret in the wrong key: never named, and scrubbed like the secret.
            scrub = _scrubber(proof, client_id)
            who = f"{credentials.source} (client id {_CLIENT_ID_WITHHELD})"
        endpoint = credentials.token_endpoint
        shown = _shown_url(endpoint)
        # Whole seconds, rounded down (never later than the truth): the Secret and the status
        # carry RFC 3339 seconds, and a restarted operator must read back the same instants.
        issued_at = self._clock().replace(microsecond=0)
        logger.debug("requesting a token for scope %s from %s as %s", scope, shown, who)
        exchange = _Exchange(
            endpoint=endpoint,
            body=urlencode(form).encode(),
            issued_at=issued_at,
            scope=scope,
            shown=shown,
            who=who,
            scrub=scrub,
            method=credentials.method,
        )
        if self._deadline is None:
            return await self._exchange(exchange)
        try:
            async with asyncio.timeout(self._deadline) as deadline:
                return await self._exchange(exchange)
        except TimeoutError:
            if not deadline.expired():
                raise
        message = (
            f"The token endpoint {shown} did not complete its answer within the"
            f" {self._deadline:g}s deadline (M2M_REQUEST_DEADLINE_SECONDS);"
            " it is retried with backoff"
        )
        logger.debug("token request to %s failed: %s", shown, message)
        raise EndpointUnavailable(message) from None

    async def _exchange(self, exchange: _Exchange) -> AccessToken:
        shown, scrub = exchange.shown, exchange.scrub
        try:
            async with self._session_here().post(
                exchange.endpoint,
                data=exchange.body,
                allow_redirects=False,
                **self._request_options(exchange.endpoint),
            ) as response:
                body = await self._read(response, shown=shown)
                return self._interpret(
                    response.status, response.headers, body, issued_at=exchange.issued_at,
                    scope=exchange.scope, shown=shown, who=exchange.who, scrub=scrub,
                    method=exchange.method,
                )  # fmt: skip
        except TokenEndpointError:
            raise
        except aiohttp.ConnectionTimeoutError:
            message = (
                f"No connection to the token endpoint {shown} within {self._connect_timeout:g}s;"
                " it is retried with backoff (check network policies, HTTPS_PROXY and NO_PROXY)"
            )
        except aiohttp.SocketTimeoutError:
            message = (
                f"The token endpoint {shown} did not answer within {self._read_timeout:g}s;"
                " it is retried with backoff"
            )
        except aiohttp.ClientSSLError as error:
            message = (
                f"TLS with the token endpoint {shown} failed ({scrub(_cause(error))}); check"
                " REQUESTS_CA_BUNDLE if it uses a private CA; it is retried with backoff"
            )
        except (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError) as error:
            message = (
                f"The proxy refused or failed the request to {shown} ({scrub(_cause(error))});"
                " check HTTPS_PROXY and NO_PROXY; it is retried with backoff"
            )
        except (aiohttp.ClientConnectionError, ConnectionError) as error:
            message = (
                f"Cannot reach the token endpoint {shown} ({scrub(_cause(error))});"
                " it is retried with backoff"
            )
        except (aiohttp.ClientError, ValueError, UnicodeError) as error:
            message = (
                f"The request to the token endpoint {shown} failed ({type(error).__name__});"
                " it is retried with backoff"
            )
        logger.debug("token request to %s failed: %s", shown, message)
        # `from None`: the client's exception may hold the request, client secret included.
        raise EndpointUnavailable(message) from None

    @staticmethod
    async def _read(response: aiohttp.ClientResponse, *, shown: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise EndpointUnavailable(
                    f"The token endpoint {shown} answered HTTP {response.status} with more"
                    f" than {MAX_RESPONSE_BYTES} bytes, which is not a token endpoint's answer;"
                    " it is retried with backoff",
                    http_status=response.status,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _interpret(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        *,
        issued_at: datetime,
        scope: str,
        shown: str,
        who: str,
        scrub: Callable[[str], str],
        method: str = CLIENT_SECRET,
    ) -> AccessToken:
        try:
            payload: Any = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: nesting deeper than the interpreter allows ("[" * 100000).
            payload = None
        if status == 200:
            return _token(headers, payload, issued_at=issued_at, shown=shown, scrub=scrub)

        fields: Mapping[str, Any] = payload if isinstance(payload, dict) else {}
        error = fields.get("error") if isinstance(fields.get("error"), str) else None
        description = fields.get("error_description")
        if isinstance(description, str) and description.strip():
            # Entra appends trace/correlation ids and a timestamp on further lines.
            description = scrub(description.strip().splitlines()[0])[:_DESCRIPTION_LIMIT]
        else:
            description = None
        codes = _codes(fields.get("error_codes"))
        trace_id = fields.get("trace_id") or headers.get("x-ms-request-id")
        correlation_id = fields.get("correlation_id") or headers.get("client-request-id")
        trace_id = scrub(str(trace_id))[:100] if trace_id else None
        correlation_id = scrub(str(correlation_id))[:100] if correlation_id else None
        error = scrub(error)[:100] if error else None
        retry_after = parse_retry_after(headers.get("Retry-After"), now=self._clock())

        kind, template, advice = _classify(status=status, error=error, codes=codes)
        if kind is CredentialsRejected:
            advice = _METHOD_ADVICE.get(method, advice)
        location = headers.get("Location")
        what = template.format(
            shown=shown,
            who=who,
            scope=repr(scope),
            location=scrub(_shown_url(location)) if location else "nowhere",
        )
        details = [f"HTTP {status}"]
        if error:
            details.append(f"error={error}")
        details.extend(f"AADSTS{code}" for code in codes)
        if retry_after is not None:
            details.append(f"Retry-After={retry_after:g}s")
        if trace_id:
            details.append(f"trace_id={trace_id}")
        if correlation_id:
            details.append(f"correlation_id={correlation_id}")
        if payload is None and body:
            content_type = headers.get("Content-Type", "unknown").split(";")[0]
            details.append(f"non-JSON body of type {scrub(content_type)[:60]}")
        message = f"{what} ({', '.join(details)})"
        if description:
            message += f": {description.rstrip('. ')}"
        message += f". {advice}"
        logger.debug("token request failed: %s", message)
        raise kind(
            message,
            http_status=status,
            error=error,
            error_description=description,
            error_codes=codes,
            trace_id=trace_id,
            correlation_id=correlation_id,
            retry_after=retry_after,
        )


def _token(
    headers: Mapping[str, str],
    payload: Any,
    *,
    issued_at: datetime,
    shown: str,
    scrub: Callable[[str], str],
) -> AccessToken:
    def malformed(problem: str) -> EndpointUnavailable:
        return EndpointUnavailable(
            f"The token endpoint {shown} answered HTTP 200 but {problem}, so no token was"
            " issued; it is retried with backoff",
            http_status=200,
        )

    if not isinstance(payload, dict):
        content_type = headers.get("Content-Type", "unknown").split(";")[0]
        raise malformed(f"not with a JSON object (content type {scrub(content_type)[:60]!r})")
    value = payload.get("access_token")
    if not isinstance(value, str) or not value:
        raise malformed("without an access_token")
    # Every whitespace character but the space is unprintable: one pass in C, not a
    # Python generator over the token's thousand or more characters.
    if not value.isprintable() or " " in value:
        raise malformed("with an access_token holding spaces or control characters")
    try:
        expires_in = _seconds(payload.get("expires_in"))
        # Read only to refuse pathological answers: the contract alone decides refreshes.
        _seconds(payload.get("ext_expires_in"))
        _seconds(payload.get("refresh_in"))
    except OverflowError:
        raise malformed(
            "with an expires_in, ext_expires_in or refresh_in too large to be a number of seconds"
        ) from None
    # Below one second the token would be born expired once rounded down to seconds.
    if expires_in is None or expires_in < 1:
        raise malformed(
            "without a usable expires_in (a number of seconds of at least 1 is required)"
        )
    token_type = payload.get("token_type")
    if not isinstance(token_type, str) or not token_type.strip():
        token_type = "Bearer"
    token = AccessToken(
        value=value,
        token_type=token_type.strip()[:40],
        issued_at=issued_at,
        expires_at=issued_at + timedelta(seconds=int(expires_in)),
    )
    logger.debug("token issued by %s, valid for %gs", shown, expires_in)
    return token
