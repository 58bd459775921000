"""The token request against a real HTTP server on loopback: wire format, answers, errors.

The HTTP client is never patched: what is asserted is what went over the socket.
"""

import base64
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, quote, quote_plus

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from m2m_token_operator.tokens.client import TokenClient, parse_retry_after
from m2m_token_operator.tokens.credentials import ClientCredentials, secret_credentials
from m2m_token_operator.tokens.model import (
    AccessToken,
    CredentialsRejected,
    EndpointUnavailable,
    ScopeRejected,
    Throttled,
    TokenEndpointError,
)

# Characters that change under form encoding, so an echoed encoded secret is caught too.
SECRET = "Zx8Q~s3cr3t+v/al=ue&more"
TOKEN = "eyJ0eXAiOiJKV1QifQ.eyJhdWQiOiJhcGk6Ly94In0.c2lnbmF0dXJlLXZhbHVl"
SCOPE = "api://prod-gcp.orders.orders-api/.default"
NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
TRACE = "0f6a2c1e-1111-2222-3333-444455556666"
CORRELATION = "9d2e7b40-aaaa-bbbb-cccc-ddddeeeeffff"


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy configured in the environment must not intercept the loopback server."""
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")


def entra_error(error: str, code: int, text: str) -> dict[str, object]:
    """An error body shaped exactly like Microsoft Entra ID's."""
    return {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {text}\r\nTrace ID: {TRACE}\r\nCorrelation ID: {CORRELATION}\r\n"
            "Timestamp: 2026-11-29 09:00:00Z"
        ),
        "error_codes": [code],
        "timestamp": "2026-11-29 09:00:00Z",
        "trace_id": TRACE,
        "correlation_id": CORRELATION,
        "error_uri": "https://login.microsoftonline.com/error?code=" + str(code),
    }


@pytest.fixture
def credentials(httpserver: HTTPServer) -> ClientCredentials:
    return secret_credentials(
        token_endpoint=httpserver.url_for("/tenant/oauth2/v2.0/token"),
        client_id="client-1",
        client_secret=SECRET,
        source="Secret shop/azure-shop-frontend",
    )


@pytest.fixture
async def client() -> AsyncIterator[TokenClient]:
    token_client = TokenClient(connect_timeout=2, read_timeout=0.3, clock=lambda: NOW)
    yield token_client
    await token_client.aclose()


PATH = "/tenant/oauth2/v2.0/token"


async def fetch_error(client: TokenClient, credentials: ClientCredentials) -> TokenEndpointError:
    with pytest.raises(TokenEndpointError) as caught:
        await client.fetch(credentials, SCOPE)
    return caught.value


# Success


async def test_wire_format(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH, method="POST").respond_with_json(
        {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": TOKEN}
    )
    await client.fetch(credentials, SCOPE)
    [(request, _)] = httpserver.log
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.query_string == b""
    form = parse_qs(request.get_data(as_text=True), keep_blank_values=True, strict_parsing=True)
    assert form == {
        "client_id": ["client-1"],
        "client_secret": [SECRET],
        "grant_type": ["client_credentials"],
        "scope": [SCOPE],
    }
    assert "Authorization" not in request.headers
    assert request.headers["User-Agent"].startswith("m2m-token-operator/")


async def test_success_with_numeric_expires_in(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH).respond_with_json(
        {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 7199, "access_token": TOKEN}
    )
    token = await client.fetch(credentials, SCOPE)
    assert token.value == TOKEN
    assert token.token_type == "Bearer"
    assert token.issued_at == NOW  # the moment the request was sent
    assert token.expires_at == NOW + timedelta(seconds=3599)
    assert token.lifetime == timedelta(seconds=3599)


async def test_success_with_string_expires_in_and_refresh_in(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    # Entra's v1 endpoint sends numbers as strings; long-lived tokens carry refresh_in.
    httpserver.expect_request(PATH).respond_with_json(
        {"expires_in": "86399", "refresh_in": "43199", "access_token": TOKEN}
    )
    token = await client.fetch(credentials, SCOPE)
    assert token.expires_at == NOW + timedelta(seconds=86399)
    assert token.token_type == "Bearer"  # the default when the endpoint says nothing


async def test_other_token_type_is_kept(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH).respond_with_json(
        {"expires_in": 60, "access_token": TOKEN, "token_type": "pop"}
    )
    assert (await client.fetch(credentials, SCOPE)).token_type == "pop"


JSON = "application/json"


@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (json.dumps({"expires_in": 3599, "token_type": "Bearer"}), JSON, "without an access_token"),
        (json.dumps({"expires_in": 0, "access_token": TOKEN}), JSON, "expires_in"),
        # Under a second: rounded down to whole seconds, the token would be born expired.
        (json.dumps({"expires_in": 0.5, "access_token": TOKEN}), JSON, "expires_in"),
        (json.dumps({"expires_in": "0.999", "access_token": TOKEN}), JSON, "expires_in"),
        (json.dumps({"expires_in": "abc", "access_token": TOKEN}), JSON, "expires_in"),
        (json.dumps({"expires_in": -5, "access_token": TOKEN}), JSON, "expires_in"),
        (json.dumps({"expires_in": True, "access_token": TOKEN}), JSON, "expires_in"),
        (json.dumps({"access_token": TOKEN}), JSON, "expires_in"),
        (json.dumps({"expires_in": 60, "access_token": "a b"}), JSON, "spaces"),
        (json.dumps({"expires_in": 60, "access_token": "ab\tcd"}), JSON, "spaces"),
        (json.dumps({"expires_in": 60, "access_token": "ab\u00a0cd"}), JSON, "spaces"),
        (json.dumps({"expires_in": 60, "access_token": "ab\u2028cd"}), JSON, "spaces"),
        (json.dumps({"expires_in": 60, "access_token": "ab\u0007cd"}), JSON, "control"),
        (json.dumps([TOKEN]), JSON, "JSON object"),
        ("<html>sign in</html>", "text/html", "JSON object"),
        ("", JSON, "JSON object"),
    ],
)
async def test_malformed_success_is_endpoint_unavailable(
    httpserver: HTTPServer,
    client: TokenClient,
    credentials: ClientCredentials,
    body: str,
    content_type: str,
    problem: str,
) -> None:
    httpserver.expect_request(PATH).respond_with_data(body, content_type=content_type)
    error = await fetch_error(client, credentials)
    assert type(error) is EndpointUnavailable
    assert error.http_status == 200
    assert problem in str(error)
    assert TOKEN not in str(error)


async def test_expires_in_of_a_second_or_more_is_rounded_down(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH).respond_with_json({"expires_in": 1.9, "access_token": TOKEN})
    assert (await client.fetch(credentials, SCOPE)).lifetime == timedelta(seconds=1)


HUGE = "1" + "0" * 400  # an integer too large for a float


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, f'{{"expires_in": {HUGE}, "access_token": "{TOKEN}"}}'),
        (200, f'{{"expires_in": 60, "ext_expires_in": {HUGE}, "access_token": "{TOKEN}"}}'),
        (200, f'{{"expires_in": 60, "refresh_in": {HUGE}, "access_token": "{TOKEN}"}}'),
        (200, "[" * 100_000),  # nested deeper than the interpreter's recursion limit
        (200, '{"a": ' * 100_000),
        (502, "[" * 100_000),
    ],
    ids=["expires_in", "ext_expires_in", "refresh_in", "nested-array", "nested-object", "502"],
)
async def test_pathological_bodies_stay_in_the_error_hierarchy(
    httpserver: HTTPServer,
    client: TokenClient,
    credentials: ClientCredentials,
    status: int,
    body: str,
) -> None:
    httpserver.expect_request(PATH).respond_with_data(body, status=status, content_type=JSON)
    error = await fetch_error(client, credentials)
    assert type(error) is EndpointUnavailable
    assert (error.reason, error.permanent) == ("EndpointUnavailable", False)
    assert error.http_status == status
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    for leaked in (TOKEN, "0000000000", "[[[", '{"a"'):
        assert leaked not in str(error)


# Errors, with Entra-shaped bodies


async def test_invalid_client_secret(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH).respond_with_json(
        entra_error("invalid_client", 7000215, "Invalid client secret provided."), status=401
    )
    error = await fetch_error(client, credentials)
    assert type(error) is CredentialsRejected
    assert (error.reason, error.permanent) == ("CredentialsRejected", True)
    assert error.http_status == 401
    assert error.error == "invalid_client"
    assert error.error_codes == (7000215,)
    assert (error.trace_id, error.correlation_id) == (TRACE, CORRELATION)
    assert error.error_description == "AADSTS7000215: Invalid client secret provided."
    message = str(error)
    for part in ("HTTP 401", "invalid_client", "AADSTS7000215", TRACE, CORRELATION):
        assert part in message
    assert "Secret shop/azure-shop-frontend (client id client-1)" in message
    assert "AZURE_APP_CLIENT_SECRET" in message  # what to do


@pytest.mark.parametrize(
    ("error", "code"),
    [("invalid_scope", 70011), ("invalid_resource", 500011)],
)
async def test_scope_rejected(
    httpserver: HTTPServer,
    client: TokenClient,
    credentials: ClientCredentials,
    error: str,
    code: int,
) -> None:
    httpserver.expect_request(PATH).respond_with_json(
        entra_error(error, code, "The scope or resource is not valid."), status=400
    )
    rejected = await fetch_error(client, credentials)
    assert type(rejected) is ScopeRejected
    assert (rejected.reason, rejected.permanent) == ("ScopeRejected", True)
    assert rejected.error_codes == (code,)
    assert f"AADSTS{code}" in str(rejected)
    assert SCOPE in str(rejected)
    assert "spec.target or spec.scope" in str(rejected)


@pytest.mark.parametrize(
    ("status", "error", "code", "expected"),
    [
        (400, "unauthorized_client", 700016, CredentialsRejected),
        (400, "invalid_request", 900023, CredentialsRejected),
        (400, "invalid_request", 90014, CredentialsRejected),
        (400, "temporarily_unavailable", 90033, EndpointUnavailable),
        (400, "invalid_request", 50196, Throttled),
        (500, "server_error", 0, EndpointUnavailable),
    ],
)
async def test_classification_of_other_entra_errors(
    httpserver: HTTPServer,
    client: TokenClient,
    credentials: ClientCredentials,
    status: int,
    error: str,
    code: int,
    expected: type[TokenEndpointError],
) -> None:
    httpserver.expect_request(PATH).respond_with_json(
        entra_error(error, code, "Something."), status=status
    )
    assert type(await fetch_error(client, credentials)) is expected


async def test_throttled_with_retry_after(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH).respond_with_data("", status=429, headers={"Retry-After": "7"})
    error = await fetch_error(client, credentials)
    assert type(error) is Throttled
    assert (error.reason, error.permanent) == ("Throttled", False)
    assert error.retry_after == 7
    assert "Retry-After=7s" in str(error)


async def test_503_without_retry_after(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH).respond_with_json(
        entra_error("temporarily_unavailable", 90033, "Try again."), status=503
    )
    error = await fetch_error(client, credentials)
    assert type(error) is EndpointUnavailable
    assert (error.reason, error.permanent) == ("EndpointUnavailable", False)
    assert error.retry_after is None
    assert error.http_status == 503


async def test_html_502_from_a_proxy(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH).respond_with_data(
        "<html><body><h1>502 Bad Gateway</h1></body></html>",
        status=502,
        content_type="text/html",
    )
    error = await fetch_error(client, credentials)
    assert type(error) is EndpointUnavailable
    assert error.error is None
    assert "HTTP 502" in str(error)
    assert "non-JSON body of type text/html" in str(error)
    assert "<html>" not in str(error)


async def test_403_html_from_a_proxy_is_held_not_hammered(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    httpserver.expect_request(PATH).respond_with_data("denied", status=403)
    error = await fetch_error(client, credentials)
    assert error.permanent
    assert "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT" in str(error)


async def test_redirect_is_not_followed_and_the_secret_not_resent(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    elsewhere = httpserver.url_for("/elsewhere")
    httpserver.expect_request(PATH).respond_with_data(
        "", status=307, headers={"Location": elsewhere + "?x=1"}
    )
    httpserver.expect_request("/elsewhere").respond_with_json(
        {"access_token": TOKEN, "expires_in": 3599}
    )
    error = await fetch_error(client, credentials)
    assert type(error) is EndpointUnavailable
    assert [request.path for request, _ in httpserver.log] == [PATH]
    assert f"redirects to {elsewhere}" in str(error)
    assert "x=1" not in str(error)


async def test_read_timeout(
    httpserver: HTTPServer, client: TokenClient, credentials: ClientCredentials
) -> None:
    """The client gives up after its read timeout (0.3 s) while the server stays silent.

    The server holds its answer until the test has the client's error, so only the
    timeout can have ended the wait; the bounds on the time are loose on purpose.
    """
    answer = threading.Event()

    def silent(request: Request) -> Response:
        answer.wait(timeout=30)
        return Response(json.dumps({"access_token": TOKEN, "expires_in": 60}))

    httpserver.expect_request(PATH).respond_with_handler(silent)
    started = time.monotonic()
    try:
        error = await fetch_error(client, credentials)
        waited = time.monotonic() - started
    finally:
        answer.set()
    assert type(error) is EndpointUnavailable
    assert "did not answer within 0.3s" in str(error)
    assert 0.3 * 0.8 <= waited < 15  # the timeout, not the server's 30 s silence, ended it


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_refused_connection(client: TokenClient) -> None:
    credentials = secret_credentials(
        token_endpoint=f"http://127.0.0.1:{closed_port()}/token",
        client_id="client-1",
        client_secret=SECRET,
        source="operator identity",
    )
    error = await fetch_error(client, credentials)
    assert type(error) is EndpointUnavailable
    assert "Cannot reach the token endpoint" in str(error)
    assert "Connection refused" in str(error)
    assert "object at 0x" not in str(error)
    assert error.__suppress_context__  # the client's error may hold the form body


def test_retry_after_forms() -> None:
    assert parse_retry_after("7", now=NOW) == 7
    assert parse_retry_after(" 120 ", now=NOW) == 120
    assert parse_retry_after("Sun, 29 Nov 2026 09:00:30 GMT", now=NOW) == 30
    assert parse_retry_after("Sun, 29 Nov 2026 08:00:00 GMT", now=NOW) == 0
    for garbage in (None, "", "-1", "soon", "nan", "inf"):
        assert parse_retry_after(garbage, now=NOW) is None


# Neither the client secret nor a token ever leaks


def echoing_error(request: Request) -> Response:
    """A broken endpoint that echoes the whole form body back, raw and encoded."""
    body = request.get_data(as_text=True)
    return Response(
        json.dumps(
            {
                "error": "invalid_client",
                "error_description": f"bad request {body} secret={SECRET} {quote(SECRET)}",
                "error_codes": [7000215],
                "trace_id": SECRET,
                "correlation_id": quote_plus(SECRET),
            }
        ),
        status=401,
        content_type="application/json",
    )


SCENARIOS: dict[str, Callable[[HTTPServer], None]] = {
    "echo": lambda s: s.expect_request(PATH).respond_with_handler(echoing_error),
    "401": lambda s: s.expect_request(PATH).respond_with_json(
        entra_error("invalid_client", 7000215, "Invalid client secret."), status=401
    ),
    "429": lambda s: s.expect_request(PATH).respond_with_data("", status=429),
    "502": lambda s: s.expect_request(PATH).respond_with_data(SECRET, status=502),
    "307": lambda s: s.expect_request(PATH).respond_with_data(
        "", status=307, headers={"Location": f"http://evil.example/?s={quote_plus(SECRET)}"}
    ),
    "bad-200": lambda s: s.expect_request(PATH).respond_with_json(
        {"access_token": TOKEN, "expires_in": "abc"}
    ),
    "html-200": lambda s: s.expect_request(PATH).respond_with_data(
        TOKEN, content_type=f"text/{SECRET}"
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_no_secret_or_token_in_errors_or_logs(
    httpserver: HTTPServer,
    client: TokenClient,
    credentials: ClientCredentials,
    caplog: pytest.LogCaptureFixture,
    scenario: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    SCENARIOS[scenario](httpserver)
    error = await fetch_error(client, credentials)
    texts = [str(error), repr(error), "".join(traceback.format_exception(error))]
    texts += [str(getattr(error, name)) for name in vars(error)]
    texts += [record.getMessage() for record in caplog.records]
    # Really captured, at DEBUG (aiohttp's own loggers say nothing per request).
    assert any(record.name == "m2m_token_operator.tokens.client" for record in caplog.records)
    for text in texts:
        for leaked in (SECRET, quote(SECRET, safe=""), quote_plus(SECRET), TOKEN):
            assert leaked not in text


async def test_no_secret_or_token_on_success_or_timeout(
    httpserver: HTTPServer,
    client: TokenClient,
    credentials: ClientCredentials,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    httpserver.expect_request(PATH).respond_with_json({"access_token": TOKEN, "expires_in": 60})
    token = await client.fetch(credentials, SCOPE)
    assert isinstance(token, AccessToken)
    assert TOKEN not in repr(token)
    assert TOKEN not in str(token)
    assert SECRET not in repr(credentials)

    refused = secret_credentials(
        token_endpoint=f"http://127.0.0.1:{closed_port()}/token",
        client_id="c",
        client_secret=SECRET,
        source="operator identity",
    )
    error = await fetch_error(client, refused)
    assert SECRET not in "".join(traceback.format_exception(error))
    assert caplog.records
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert TOKEN not in record.getMessage()


# The client id is named only when it cannot be a secret put into the wrong key

GUID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


def not_found_echoing_client_id(request: Request) -> Response:
    """Entra's answer to an unknown client id, which it quotes back, raw and encoded."""
    client_id = parse_qs(request.get_data(as_text=True))["client_id"][0]
    body = entra_error(
        "unauthorized_client",
        700016,
        f"Application with identifier '{client_id}' was not found in the directory"
        f" (request {request.get_data(as_text=True)}, {quote(client_id, safe='')}).",
    )
    body["trace_id"] = client_id
    body["correlation_id"] = quote_plus(client_id)
    return Response(json.dumps(body), status=400, content_type="application/json")


async def test_swapped_client_id_and_secret_do_not_leak(
    httpserver: HTTPServer, client: TokenClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    swapped = secret_credentials(
        token_endpoint=httpserver.url_for(PATH),
        client_id=SECRET,  # AZURE_APP_CLIENT_ID and AZURE_APP_CLIENT_SECRET swapped
        client_secret=GUID,
        source="Secret shop/azure-shop-frontend",
    )
    httpserver.expect_request(PATH).respond_with_handler(not_found_echoing_client_id)
    error = await fetch_error(client, swapped)
    assert type(error) is CredentialsRejected
    assert error.error_codes == (700016,)
    message = str(error)
    assert "Secret shop/azure-shop-frontend (client id <not a GUID, not shown>)" in message
    assert "Application with identifier '[REDACTED]' was not found" in message
    texts = [message, repr(error), "".join(traceback.format_exception(error))]
    texts += [str(getattr(error, name)) for name in vars(error)]
    texts += [record.getMessage() for record in caplog.records]
    for text in texts:
        for leaked in (SECRET, quote(SECRET, safe=""), quote_plus(SECRET), GUID):
            assert leaked not in text


def identity_with_client_id(httpserver: HTTPServer, client_id: str) -> ClientCredentials:
    """The operator's identity with `client_id`, against an endpoint that echoes it back."""
    httpserver.expect_request(PATH).respond_with_handler(not_found_echoing_client_id)
    return secret_credentials(
        token_endpoint=httpserver.url_for(PATH),
        client_id=client_id,
        client_secret=SECRET,
        source="operator identity",
    )


@pytest.mark.parametrize(
    "client_id",
    [
        SECRET,
        "aB3~xYz.Qw8_9kLmNoPqRsTuVwXyZ0123456789",  # shaped like an Entra client secret
        "Client-1",  # upper case
        "client_1",
        "1client",
        "client-1\n",
        "c" * 64,  # longer than a plain name may be
        "{" + GUID + "}",
        GUID + "0",
    ],
)
async def test_client_id_not_safe_to_show_is_withheld(
    httpserver: HTTPServer, client: TokenClient, client_id: str
) -> None:
    error = await fetch_error(client, identity_with_client_id(httpserver, client_id))
    assert "operator identity (client id <not a GUID, not shown>)" in str(error)
    for leaked in (client_id, quote(client_id, safe=""), quote_plus(client_id)):
        assert leaked not in str(error)


@pytest.mark.parametrize(
    "client_id", [GUID, GUID.upper(), "client-1", "e2e-app", "c", "a" + "0" * 62]
)
async def test_guid_or_plain_client_id_is_shown(
    httpserver: HTTPServer, client: TokenClient, client_id: str
) -> None:
    error = await fetch_error(client, identity_with_client_id(httpserver, client_id))
    assert f"operator identity (client id {client_id})" in str(error)
    assert f"identifier '{client_id}' was not found" in str(error)


# The environment's proxy and CA bundle are honoured; certificates are always verified


async def fetch_through_proxy(monkeypatch: pytest.MonkeyPatch, proxy: str) -> AccessToken:
    """A token for an endpoint only the proxy from the environment can reach."""
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    proxied = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        return await proxied.fetch(
            secret_credentials(
                token_endpoint="http://idp.example.invalid/token",
                client_id="c",
                client_secret=SECRET,
                source="operator identity",
            ),
            SCOPE,
        )
    finally:
        await proxied.aclose()


async def test_proxy_from_the_environment_is_used(
    httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loopback server plays the proxy: a plain-http request through a proxy arrives
    # with the absolute URL of the real destination.
    httpserver.expect_request("/token").respond_with_json({"access_token": TOKEN, "expires_in": 60})
    token = await fetch_through_proxy(monkeypatch, httpserver.url_for("/").rstrip("/"))
    assert token.value == TOKEN
    [(request, _)] = httpserver.log
    assert request.host == "idp.example.invalid"


async def test_proxy_credentials_go_to_the_proxy_only(
    httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpserver.expect_request("/token").respond_with_json({"access_token": TOKEN, "expires_in": 60})
    proxy = httpserver.url_for("/").rstrip("/").replace("http://", "http://proxy%20user:p%40ss@")
    await fetch_through_proxy(monkeypatch, proxy)
    [(request, _)] = httpserver.log
    expected = "Basic " + base64.b64encode(b"proxy user:p@ss").decode()
    assert request.headers["Proxy-Authorization"] == expected
    assert "Authorization" not in request.headers


async def test_no_proxy_bypasses_the_proxy(
    httpserver: HTTPServer, client: TokenClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy nobody listens on: only a direct request reaches the endpoint.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{closed_port()}")
    httpserver.expect_request(PATH).respond_with_json({"access_token": TOKEN, "expires_in": 60})
    direct = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        credentials = secret_credentials(
            token_endpoint=httpserver.url_for(PATH),
            client_id="c",
            client_secret=SECRET,
            source="operator identity",
        )
        assert (await direct.fetch(credentials, SCOPE)).value == TOKEN
    finally:
        await direct.aclose()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HTTPServer, str]]:
    """An https token endpoint whose certificate no system CA has signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "m2m test endpoint")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file = directory / "cert.pem"
    key_file = directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server = HTTPServer(host="127.0.0.1", port=0, ssl_context=context)
    server.start()
    yield server, str(cert_file)
    server.clear()
    server.stop()


async def test_certificates_are_verified_and_the_ca_bundle_honoured(
    tls_server: tuple[HTTPServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, ca_bundle = tls_server
    server.expect_request("/token").respond_with_json({"access_token": TOKEN, "expires_in": 60})
    credentials = secret_credentials(
        token_endpoint=server.url_for("/token"),
        client_id="c",
        client_secret=SECRET,
        source="operator identity",
    )
    assert credentials.token_endpoint.startswith("https://")

    untrusting = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        error = await fetch_error(untrusting, credentials)
    finally:
        await untrusting.aclose()
    assert type(error) is EndpointUnavailable
    assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert "REQUESTS_CA_BUNDLE" in str(error)
    assert server.log == []  # no request was sent over the unverified connection

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_bundle)
    trusting = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        assert (await trusting.fetch(credentials, SCOPE)).value == TOKEN
    finally:
        await trusting.aclose()
