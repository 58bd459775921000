"""One identity per application, on the real API server: federation, private_key_jwt, secrets.

The operator runs as its own ServiceAccount with the shipped RBAC, so the
federation opt-in is real: without a RoleBinding to
`m2m-token-operator:federation` the API server refuses the mint (403). The
token endpoint is a small recording front on loopback, which keeps each form
the operator sent (to check the assertion's claims) and can refuse a chosen
client secret as Entra would, in front of the verifying token front
(`devenv/tokenfront.py`), in front of mock-oauth2-server. The verifying front
checks what Entra checks: a federated assertion's signature against the API
server's own JWKS, its issuer, subject and audience; a private_key_jwt
assertion's signature against the public half of the application's key, its
`aud` (the URL the operator posted to: the recording front passes the Host
header on, as a reverse proxy does), `iss` = `sub`, lifetime and `jti`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from kubernetes import client as k8s

from devenv.install import OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT
from devenv.operatorprocess import OperatorProcess
from devenv.tokenserver import DEFAULT_ISSUER, TokenServer

from ._support import (
    CLUSTER_NAME,
    OPERATOR_CLIENT_SECRET,
    Kube,
    OperatorFactory,
    condition_of,
    find_leaks,
    token_request,
    wait_for,
)

SCOPE = f"api://{CLUSTER_NAME}.orders.orders-api/.default"
FEDERATION_AUDIENCE = "api://AzureADTokenExchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
RIGHT_SECRET = "e2e-right-secret-4d5e6f"
WRONG_SECRET = "e2e-wrong-secret-7a8b9c"


@dataclass(frozen=True)
class Recorded:
    path: str
    form: dict[str, str]


class RecordingFront:
    """A token endpoint on 127.0.0.1 that records each form and forwards it upstream.

    A form whose client_secret is in `refused` gets Entra's answer to a wrong
    secret (401 invalid_client) instead: mock-oauth2-server accepts any secret.
    Every other form goes upstream unchanged, with the Host header it came with.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.refused: set[str] = set()
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
                with front._lock:
                    front.requests.append(Recorded(path=self.path, form=form))
                if form.get("client_secret") in front.refused:
                    status = 401
                    answer = json.dumps(
                        {
                            "error": "invalid_client",
                            "error_description": "AADSTS7000215: Invalid client secret provided.",
                            "error_codes": [7000215],
                        }
                    ).encode()
                    content_type = "application/json"
                else:
                    forwarded = requests.post(
                        front.upstream + self.path,
                        data=body,
                        headers={
                            "Content-Type": "application/x-www-form-urlencoded",
                            # The verifying front checks `aud` against the URL asked for.
                            "Host": self.headers.get("Host", ""),
                        },
                        timeout=10,
                    )
                    status = forwarded.status_code
                    answer = forwarded.content
                    content_type = forwarded.headers.get("Content-Type", "application/json")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, issuer: str = DEFAULT_ISSUER) -> str:
        return f"http://127.0.0.1:{self.port}/{issuer}/token"

    def forms(self, client_id: str) -> list[dict[str, str]]:
        with self._lock:
            return [r.form for r in self.requests if r.form.get("client_id") == client_id]


@pytest.fixture
def front(token_server: TokenServer) -> Iterator[RecordingFront]:
    recording = RecordingFront(token_server.base_url)
    recording.start()
    yield recording
    recording.stop()


@pytest.fixture
def identity_operator(
    start_operator: OperatorFactory, front: RecordingFront, token_server: TokenServer
) -> OperatorProcess:
    """An operator that may send to the front, and looks again 2 s after a permanent failure."""
    return start_operator(
        settings={
            "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": (
                f"127.0.0.1:{token_server.port},127.0.0.1:{front.port}"
            ),
            "M2M_PERMANENT_FAILURE_HOLD_SECONDS": "2",
        }
    )


def _ready_reason(kube: Kube, namespace: str, name: str) -> tuple[str | None, str]:
    status = (kube.get_token_request(namespace, name) or {}).get("status") or {}
    condition = condition_of(status, "Ready")
    return condition.get("reason"), str(condition.get("message") or "")


def _wait_reason(
    kube: Kube, namespace: str, name: str, reason: str, operator: OperatorProcess
) -> str:
    """Wait for the Ready condition's reason; its message."""

    def reached() -> str | None:
        found, message = _ready_reason(kube, namespace, name)
        return message if found == reason else None

    return wait_for(reached, timeout=30, what=f"{name} Ready reason {reason}", operator=operator)


def _leaks(kube: Kube, namespace: str, operator: OperatorProcess, needles: list[str]) -> list[str]:
    haystacks = {"the operator's log": operator.log_text()}
    for body in kube.list_token_requests(namespace):
        haystacks[f"TokenRequest {body['metadata']['name']}"] = json.dumps(body)
    for number, event in enumerate(kube.events([namespace])):
        haystacks[f"event {number} {event.reason}"] = json.dumps(event.to_dict(), default=str)
    return find_leaks(haystacks, needles)


def _service_account(name: str, annotations: dict[str, str]) -> k8s.V1ServiceAccount:
    return k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name, annotations=annotations))


def _grant_federation(kube: Kube, namespace: str) -> None:
    binding: Any = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "m2m-token-operator-federation"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "m2m-token-operator:federation",
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": OPERATOR_SERVICE_ACCOUNT,
                "namespace": OPERATOR_NAMESPACE,
            }
        ],
    }
    k8s.RbacAuthorizationV1Api(kube.api).create_namespaced_role_binding(namespace, binding)


# --- workload identity federation ---------------------------------------------------


def test_federation_needs_the_namespace_rolebinding(
    kube: Kube,
    namespace: str,
    identity_operator: OperatorProcess,
    front: RecordingFront,
    federation: TokenServer,
) -> None:
    operator = identity_operator
    # The application's federated credential: this cluster's issuer, this ServiceAccount.
    federation.register_federated("e2e-federated", f"system:serviceaccount:{namespace}:shop-fe")
    kube.core.create_namespaced_service_account(
        namespace, _service_account("shop-fe", {"m2m.dev/token-endpoint": front.url()})
    )
    body = token_request("federated", scope=SCOPE)
    body["spec"]["credentials"] = {"serviceAccountRef": {"name": "shop-fe"}}
    kube.create_token_request(namespace, body)

    # No client id yet: CredentialsMissing, found again by the retry schedule (no watch).
    message = _wait_reason(kube, namespace, "federated", "CredentialsMissing", operator)
    assert "azure.workload.identity/client-id" in message
    kube.core.patch_namespaced_service_account(
        "shop-fe",
        namespace,
        {"metadata": {"annotations": {"azure.workload.identity/client-id": "e2e-federated"}}},
    )

    # Annotated, but the namespace has not let the operator mint its tokens: 403.
    message = _wait_reason(kube, namespace, "federated", "FederationNotPermitted", operator)
    assert "RoleBinding" in message
    assert "m2m-token-operator:federation" in message
    assert front.forms("e2e-federated") == []  # no token request without an assertion
    assert kube.get_secret(namespace, "federated") is None

    _grant_federation(kube, namespace)
    kube.wait_ready(namespace, "federated", operator=operator)
    secret = kube.get_secret(namespace, "federated")
    assert secret is not None

    # What reached the token endpoint: the ServiceAccount's own token as the assertion.
    [form] = front.forms("e2e-federated")
    assert form["client_assertion_type"] == JWT_BEARER
    assert "client_secret" not in form
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == SCOPE
    claims = jwt.decode(form["client_assertion"], options={"verify_signature": False})
    assert claims["sub"] == f"system:serviceaccount:{namespace}:shop-fe"
    assert claims["aud"] == [FEDERATION_AUDIENCE]
    assert claims["exp"] - claims["iat"] == 600  # the shortest lifetime the API allows
    # And the token endpoint verified it as Entra would (signature by the API server's keys).
    [checked] = federation.front.requests_for("e2e-federated")
    assert (checked.method, checked.accepted) == ("client_assertion", True)

    # Events are posted after the status the waits above saw: wait for them themselves.
    kube.wait_events(
        [namespace],
        {"CredentialsMissing": 1, "FederationNotPermitted": 1, "TokenIssued": 1},
        operator=operator,
    )
    needles = [form["client_assertion"], form["client_assertion"].rsplit(".", 1)[1]]
    needles += [secret.token, OPERATOR_CLIENT_SECRET]
    assert _leaks(kube, namespace, operator, needles) == []


# --- private_key_jwt ------------------------------------------------------------------


def test_private_key_jwt_credentials_secret_gets_a_token(
    kube: Kube,
    namespace: str,
    identity_operator: OperatorProcess,
    front: RecordingFront,
    token_server: TokenServer,
) -> None:
    operator = identity_operator
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key))
    jwk["kid"] = "e2e-key-1"
    public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    token_server.register_jwk("e2e-pkjwt", {**public, "kid": "e2e-key-1"})
    kube.create_secret(
        namespace,
        "app-credentials",
        {
            "AZURE_APP_CLIENT_ID": "e2e-pkjwt",
            "AZURE_APP_JWK": json.dumps(jwk),
            # Both present: the private key is used, the secret is never sent.
            "AZURE_APP_CLIENT_SECRET": RIGHT_SECRET,
            "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": front.url(),
        },
    )
    kube.create_token_request(
        namespace, token_request("pkjwt", scope=SCOPE, credentials_secret="app-credentials")
    )
    kube.wait_ready(namespace, "pkjwt", operator=operator)
    secret = kube.get_secret(namespace, "pkjwt")
    assert secret is not None

    [form] = front.forms("e2e-pkjwt")
    assert "client_secret" not in form
    assert form["client_assertion_type"] == JWT_BEARER
    claims = jwt.decode(
        form["client_assertion"],
        key.public_key(),
        algorithms=["RS256"],
        audience=front.url(),
        issuer="e2e-pkjwt",
        leeway=30,
    )
    assert claims["sub"] == "e2e-pkjwt"
    assert claims["exp"] - claims["iat"] <= 600
    assert jwt.get_unverified_header(form["client_assertion"])["kid"] == "e2e-key-1"
    [checked] = token_server.front.requests_for("e2e-pkjwt")
    assert (checked.method, checked.accepted) == ("client_assertion", True)

    needles = [jwk[member] for member in ("d", "p", "q", "dp", "dq", "qi")]
    needles += [RIGHT_SECRET, form["client_assertion"], secret.token]
    assert _leaks(kube, namespace, operator, needles) == []


# --- the cache key carries the credential ---------------------------------------------


def test_same_client_id_with_a_wrong_secret_is_never_served_the_right_ones_token(
    kube: Kube, namespace: str, identity_operator: OperatorProcess, front: RecordingFront
) -> None:
    operator = identity_operator
    front.refused.add(WRONG_SECRET)
    for name, client_secret in (
        ("right-credentials", RIGHT_SECRET),
        ("wrong-credentials", WRONG_SECRET),
    ):
        kube.create_secret(
            namespace,
            name,
            {
                "AZURE_APP_CLIENT_ID": "e2e-shared",
                "AZURE_APP_CLIENT_SECRET": client_secret,
                "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": front.url(),
            },
        )
    kube.create_token_request(
        namespace, token_request("right", scope=SCOPE, credentials_secret="right-credentials")
    )
    kube.wait_ready(namespace, "right", operator=operator)
    kube.create_token_request(
        namespace, token_request("wrong", scope=SCOPE, credentials_secret="wrong-credentials")
    )

    message = _wait_reason(kube, namespace, "wrong", "CredentialsRejected", operator)
    assert "AADSTS7000215" in message
    assert kube.get_secret(namespace, "wrong") is None  # never the right one's token
    sent = [form.get("client_secret", "") for form in front.forms("e2e-shared")]
    assert sorted(sent) == sorted([RIGHT_SECRET, WRONG_SECRET])
    right = kube.get_secret(namespace, "right")
    assert right is not None
    assert _leaks(kube, namespace, operator, [RIGHT_SECRET, WRONG_SECRET, right.token]) == []
