"""Workload identity federation: the ServiceAccount's annotations, the mint, the form on the wire.

The Kubernetes API and the token endpoint are real HTTP servers on loopback
(pytest-httpserver): the mint goes through the real `kubernetes` client.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import kubernetes
import pytest
from pytest_httpserver import HTTPServer

from m2m_token_operator.api.constants import DEFAULT_FEDERATION_AUDIENCE
from m2m_token_operator.kube.federation import (
    CLIENT_ID_ANNOTATION,
    EXPIRATION_SECONDS,
    TENANT_ID_ANNOTATION,
    TOKEN_ENDPOINT_ANNOTATION,
    FederationNotPermitted,
    ServiceAccountGone,
    ServiceAccountTokenFailed,
    federated_identity,
)
from m2m_token_operator.kube.kube_api import KubeApi, KubeError, NotFound
from m2m_token_operator.tokens.assertion import JWT_BEARER
from m2m_token_operator.tokens.cache import TokenCache
from m2m_token_operator.tokens.client import TokenClient
from m2m_token_operator.tokens.credentials import (
    FEDERATED,
    CredentialsError,
    EndpointPolicy,
    secret_credentials,
)
from m2m_token_operator.tokens.model import CredentialsRejected, is_permanent
from m2m_token_operator.tokens.redaction import REDACTOR
from m2m_token_operator.tokens.timing import RefreshPolicy, RetryPolicy

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2ln-sa-token"
SCOPE = "api://prod-gcp.orders.orders-api/.default"
OWN_ENDPOINT = "https://idp.internal.example/token"
POLICY = EndpointPolicy(
    allowed_hosts=frozenset({"login.microsoftonline.com", "127.0.0.1", "localhost"}),
    allow_insecure_http=True,
)


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")


def account(annotations: dict[str, str], *, uid: str = "uid-1") -> dict[str, Any]:
    return {
        "metadata": {"name": "shop-fe", "namespace": "shop", "uid": uid, "annotations": annotations}
    }


class RecordingMint:
    """Stands in for `KubeApi.mint_service_account_token`: records each call."""

    def __init__(self, *, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, str, str, int]] = []
        self.error = error

    def __call__(
        self, namespace: str, name: str, *, audience: str, expiration_seconds: int
    ) -> tuple[str, str | None]:
        self.calls.append((namespace, name, audience, expiration_seconds))
        if self.error is not None:
            raise self.error
        return SA_TOKEN, "2026-11-29T09:10:00Z"


def identity(
    annotations: dict[str, str],
    *,
    mint: RecordingMint | None = None,
    default_endpoint: str | None = OWN_ENDPOINT,
    uid: str = "uid-1",
) -> Any:
    return federated_identity(
        account(annotations, uid=uid),
        namespace="shop",
        name="shop-fe",
        policy=POLICY,
        default_endpoint=default_endpoint,
        allow_insecure_http=False,
        audience=DEFAULT_FEDERATION_AUDIENCE,
        mint=mint or RecordingMint(),
    )


def identity_at(endpoint: str, *, mint: Callable[..., tuple[str, str | None]]) -> Any:
    """The federated identity of shop/shop-fe, sending to `endpoint` (a loopback server)."""
    return federated_identity(
        account({CLIENT_ID_ANNOTATION: CLIENT_ID, TOKEN_ENDPOINT_ANNOTATION: endpoint}),
        namespace="shop",
        name="shop-fe",
        policy=POLICY,
        default_endpoint=None,
        allow_insecure_http=True,
        audience=DEFAULT_FEDERATION_AUDIENCE,
        mint=mint,
    )


# The ServiceAccount's annotations


def test_tenant_annotation_gives_the_entra_endpoint() -> None:
    credentials = identity({CLIENT_ID_ANNOTATION: CLIENT_ID, TENANT_ID_ANNOTATION: "contoso.com"})
    assert credentials.client_id == CLIENT_ID
    assert credentials.method == FEDERATED
    assert credentials.client_secret is None
    assert credentials.token_endpoint == (
        "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
    )
    assert credentials.source == "ServiceAccount shop/shop-fe"


def test_endpoint_annotation_wins_and_is_allow_listed() -> None:
    annotations = {
        CLIENT_ID_ANNOTATION: CLIENT_ID,
        TENANT_ID_ANNOTATION: "t",
        TOKEN_ENDPOINT_ANNOTATION: "https://login.microsoftonline.com/other/oauth2/v2.0/token",
    }
    assert identity(annotations).token_endpoint.endswith("/other/oauth2/v2.0/token")
    with pytest.raises(CredentialsError) as caught:
        identity({**annotations, TOKEN_ENDPOINT_ANNOTATION: "https://attacker.example/token"})
    assert caught.value.reason == "EndpointNotAllowed"
    assert "annotation m2m.dev/token-endpoint" in str(caught.value)


def test_without_endpoint_annotations_the_operators_own_endpoint() -> None:
    assert identity({CLIENT_ID_ANNOTATION: CLIENT_ID}).token_endpoint == OWN_ENDPOINT
    with pytest.raises(CredentialsError) as caught:
        identity({CLIENT_ID_ANNOTATION: CLIENT_ID}, default_endpoint=None)
    assert caught.value.reason == "CredentialsMissing"


def test_a_tenant_that_could_change_the_url_is_invalid() -> None:
    with pytest.raises(CredentialsError) as caught:
        identity({CLIENT_ID_ANNOTATION: CLIENT_ID, TENANT_ID_ANNOTATION: "evil/../x?"})
    assert caught.value.reason == "CredentialsInvalid"


def test_missing_service_account_or_client_id_is_credentials_missing() -> None:
    with pytest.raises(CredentialsError) as caught:
        federated_identity(
            None,
            namespace="shop",
            name="shop-fe",
            policy=POLICY,
            default_endpoint=OWN_ENDPOINT,
            allow_insecure_http=False,
            audience=DEFAULT_FEDERATION_AUDIENCE,
            mint=RecordingMint(),
        )
    assert caught.value.reason == "CredentialsMissing"
    assert "ServiceAccount shop/shop-fe not found" in str(caught.value)
    with pytest.raises(CredentialsError) as caught:
        identity({TENANT_ID_ANNOTATION: "t"})
    assert caught.value.reason == "CredentialsMissing"
    assert "azure.workload.identity/client-id" in str(caught.value)


def test_fingerprint_is_the_service_accounts_identity() -> None:
    annotations = {CLIENT_ID_ANNOTATION: CLIENT_ID}
    first = identity(annotations).fingerprint()
    assert identity(annotations).fingerprint() == first
    assert identity(annotations, uid="uid-2").fingerprint() != first  # recreated


# The mint and its failures


def test_each_assertion_is_a_fresh_mint_with_the_audience_and_shortest_lifetime() -> None:
    mint = RecordingMint()
    credentials = identity({CLIENT_ID_ANNOTATION: CLIENT_ID}, mint=mint)
    assert mint.calls == []  # nothing minted until a token request needs it
    assert credentials.client_assertion is not None
    assert credentials.client_assertion() == SA_TOKEN
    assert credentials.client_assertion() == SA_TOKEN
    assert mint.calls == [("shop", "shop-fe", DEFAULT_FEDERATION_AUDIENCE, EXPIRATION_SECONDS)] * 2
    assert EXPIRATION_SECONDS == 600
    assert REDACTOR.scrub(f"minted {SA_TOKEN}") == "minted [REDACTED]"


def test_forbidden_mint_is_federation_not_permitted() -> None:
    error = KubeError(action="create token", status=403, reason="Forbidden")
    credentials = identity({CLIENT_ID_ANNOTATION: CLIENT_ID}, mint=RecordingMint(error=error))
    assert credentials.client_assertion is not None
    with pytest.raises(FederationNotPermitted) as caught:
        credentials.client_assertion()
    assert caught.value.reason == "FederationNotPermitted"
    assert is_permanent(caught.value)  # held like a rejected credential
    message = str(caught.value)
    assert "RoleBinding in shop to the ClusterRole m2m-token-operator:federation" in message


def test_other_mint_failures() -> None:
    gone = identity(
        {CLIENT_ID_ANNOTATION: CLIENT_ID},
        mint=RecordingMint(error=NotFound(action="create token", status=404, reason="Not Found")),
    )
    assert gone.client_assertion is not None
    with pytest.raises(ServiceAccountGone) as missing:
        gone.client_assertion()
    assert missing.value.reason == "CredentialsMissing"
    failing = identity(
        {CLIENT_ID_ANNOTATION: CLIENT_ID},
        mint=RecordingMint(error=KubeError(action="create token", status=500, reason="Oops")),
    )
    assert failing.client_assertion is not None
    with pytest.raises(ServiceAccountTokenFailed) as transient:
        failing.client_assertion()
    assert not is_permanent(transient.value)


# Against real HTTP servers on loopback


@pytest.fixture
def api_server() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture
def kube(api_server: HTTPServer) -> Iterator[KubeApi]:
    configuration = kubernetes.client.Configuration()
    configuration.host = api_server.url_for("").rstrip("/")
    configuration.retries = 0
    api = KubeApi(kubernetes.client.ApiClient(configuration))
    yield api
    api.close()


MINT_PATH = "/api/v1/namespaces/shop/serviceaccounts/shop-fe/token"


def test_kube_mint_asks_the_token_request_api(api_server: HTTPServer, kube: KubeApi) -> None:
    api_server.expect_request(MINT_PATH, method="POST").respond_with_json(
        {"status": {"token": SA_TOKEN, "expirationTimestamp": "2026-11-29T09:10:00Z"}}, status=201
    )
    token, expires = kube.mint_service_account_token(
        "shop", "shop-fe", audience="api://AzureADTokenExchange", expiration_seconds=600
    )
    assert (token, expires) == (SA_TOKEN, "2026-11-29T09:10:00Z")
    [(request, _)] = api_server.log
    body = json.loads(request.get_data(as_text=True))
    assert body["kind"] == "TokenRequest"
    assert body["spec"] == {"audiences": ["api://AzureADTokenExchange"], "expirationSeconds": 600}


def test_kube_mint_forbidden_is_a_403_kube_error(api_server: HTTPServer, kube: KubeApi) -> None:
    api_server.expect_request(MINT_PATH, method="POST").respond_with_json(
        {"kind": "Status", "reason": "Forbidden", "code": 403}, status=403
    )
    with pytest.raises(KubeError) as caught:
        kube.mint_service_account_token(
            "shop", "shop-fe", audience="api://AzureADTokenExchange", expiration_seconds=600
        )
    assert caught.value.status == 403


async def test_the_form_on_the_wire(
    api_server: HTTPServer, kube: KubeApi, httpserver: HTTPServer
) -> None:
    api_server.expect_request(MINT_PATH, method="POST").respond_with_json(
        {"status": {"token": SA_TOKEN, "expirationTimestamp": "2026-11-29T09:10:00Z"}}, status=201
    )
    httpserver.expect_request("/token", method="POST").respond_with_json(
        {"token_type": "Bearer", "expires_in": 3599, "access_token": "issued-token-value"}
    )
    credentials = identity_at(httpserver.url_for("/token"), mint=kube.mint_service_account_token)
    client = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        token = await client.fetch(credentials, SCOPE)
    finally:
        await client.aclose()
    assert token.value == "issued-token-value"
    [(request, _)] = httpserver.log
    form = parse_qs(request.get_data(as_text=True), strict_parsing=True)
    assert form == {
        "client_id": [CLIENT_ID],
        "client_assertion_type": [JWT_BEARER],
        "client_assertion": [SA_TOKEN],
        "grant_type": ["client_credentials"],
        "scope": [SCOPE],
    }


async def test_a_forbidden_mint_sends_no_token_request(
    api_server: HTTPServer, kube: KubeApi, httpserver: HTTPServer
) -> None:
    api_server.expect_request(MINT_PATH, method="POST").respond_with_json({}, status=403)
    credentials = identity_at(httpserver.url_for("/token"), mint=kube.mint_service_account_token)
    client = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        with pytest.raises(FederationNotPermitted):
            await client.fetch(credentials, SCOPE)
    finally:
        await client.aclose()
    assert httpserver.log == []


async def test_the_secret_form_is_unchanged(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token", method="POST").respond_with_json(
        {"token_type": "Bearer", "expires_in": 3599, "access_token": "issued-token-value"}
    )
    credentials = secret_credentials(
        token_endpoint=httpserver.url_for("/token"),
        client_id=CLIENT_ID,
        client_secret="a-client-secret",
        source="operator identity",
    )
    client = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        await client.fetch(credentials, SCOPE)
    finally:
        await client.aclose()
    [(request, _)] = httpserver.log
    form = parse_qs(request.get_data(as_text=True), strict_parsing=True)
    assert "client_assertion" not in form
    assert form["client_secret"] == ["a-client-secret"]


async def test_a_rejected_assertion_gets_advice_about_the_federated_credential(
    api_server: HTTPServer, kube: KubeApi, httpserver: HTTPServer
) -> None:
    api_server.expect_request(MINT_PATH, method="POST").respond_with_json(
        {"status": {"token": SA_TOKEN, "expirationTimestamp": "2026-11-29T09:10:00Z"}}, status=201
    )
    httpserver.expect_request("/token", method="POST").respond_with_json(
        {
            "error": "invalid_client",
            "error_description": f"AADSTS700213: No matching federated identity record {SA_TOKEN}",
            "error_codes": [700213],
        },
        status=400,
    )
    credentials = identity_at(httpserver.url_for("/token"), mint=kube.mint_service_account_token)
    client = TokenClient(connect_timeout=2, read_timeout=2)
    try:
        with pytest.raises(CredentialsRejected) as caught:
            await client.fetch(credentials, SCOPE)
    finally:
        await client.aclose()
    message = str(caught.value)
    assert "federated credential" in message
    assert "AZURE_APP_CLIENT_SECRET" not in message
    assert SA_TOKEN not in message  # an echoed assertion is scrubbed


async def test_the_mint_runs_on_the_assertion_thread_never_on_the_event_loop(
    httpserver: HTTPServer,
) -> None:
    threads: list[str] = []

    def mint(
        namespace: str, name: str, *, audience: str, expiration_seconds: int
    ) -> tuple[str, str | None]:
        threads.append(threading.current_thread().name)
        return SA_TOKEN, None

    httpserver.expect_request("/token", method="POST").respond_with_json(
        {"token_type": "Bearer", "expires_in": 3599, "access_token": "issued-token-value"}
    )
    credentials = identity_at(httpserver.url_for("/token"), mint=mint)
    client = TokenClient(connect_timeout=2, read_timeout=2)
    cache = TokenCache(
        fetch=client.fetch,
        refresh_policy=RefreshPolicy(),
        retry_policy=RetryPolicy(),
        clock=lambda: datetime.now(UTC),
    )
    try:
        result = await cache.get(credentials, SCOPE)
    finally:
        cache.close()
        await client.aclose()
    assert result.token is not None
    assert len(threads) == 1
    assert threads[0].startswith("m2m-assertion")
    assert threads[0] != threading.main_thread().name
