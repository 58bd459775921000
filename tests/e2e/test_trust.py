"""Who may use the operator's identity, the operator-keyed restart seal, the verifying front.

On the real API server: the namespace selector is evaluated by the server and
follows label changes within seconds; the seal key Secret is created once in
the operator's namespace and a token sealed with another key is not reused;
the token front verifies ServiceAccount tokens against the API server's own
JWKS, as Entra ID does for workload identity federation.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import uuid
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes import client as k8s

from devenv.controlplane import Cluster
from devenv.install import OPERATOR_NAMESPACE, REPO_ROOT
from devenv.operatorprocess import OperatorProcess
from devenv.tokenfront import ASSERTION_TYPE, FEDERATION_AUDIENCE
from devenv.tokenserver import TokenServer, jwt_claims

from ._support import (
    CLUSTER_NAME,
    OPERATOR_CLIENT_ID,
    Kube,
    OperatorFactory,
    condition_of,
    kubectl,
    log_problems,
    token_request,
    wait_for,
)

SELECTOR_LABEL = "m2m.dev/operator-identity"
SELECTOR = f"{SELECTOR_LABEL}=allowed"
SEAL_KEY_SECRET = "m2m-token-operator-seal-key"
# A label change must take effect "within seconds".
LABEL_REACTION = 10.0


def _scope(namespace: str) -> str:
    return f"api://e2e.{namespace}.trust-api/.default"


def _requests_for(operator: OperatorProcess, scope: str, *, since: int = 0) -> int:
    """How often the operator asked the token endpoint for `scope` (its debug log says so)."""
    return operator.log_text()[since:].count(f"requesting a token for scope {scope} ")


def _label(admin_api: k8s.ApiClient, namespace: str, value: str | None) -> None:
    k8s.CoreV1Api(admin_api).patch_namespace(
        namespace, {"metadata": {"labels": {SELECTOR_LABEL: value}}}
    )


def _conditions(kube: Kube, namespace: str, name: str) -> tuple[Any, Any] | None:
    body = kube.get_token_request(namespace, name)
    status = (body or {}).get("status") or {}
    if not status.get("conditions"):
        return None
    return condition_of(status, "Ready"), condition_of(status, "Degraded")


def _not_allowed(kube: Kube, namespace: str, name: str, *, ready: str) -> Any:
    def check() -> tuple[Any, Any] | None:
        found = _conditions(kube, namespace, name)
        if found is None:
            return None
        ready_condition, degraded = found
        if (
            degraded["status"] == "True"
            and degraded["reason"] == "OperatorIdentityNotAllowed"
            and ready_condition["status"] == ready
        ):
            return found
        return None

    return check


def test_operator_identity_follows_the_namespace_label(
    kube: Kube,
    namespace: str,
    admin_api: k8s.ApiClient,
    start_operator: OperatorFactory,
) -> None:
    operator = start_operator(settings={"M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": SELECTOR})
    scope = _scope(namespace)
    kube.create_token_request(namespace, token_request("trust-api", scope=scope))

    # Not labelled: no token request, a status that says why and what to do.
    ready, degraded = wait_for(
        _not_allowed(kube, namespace, "trust-api", ready="False"),
        timeout=30,
        what="OperatorIdentityNotAllowed",
        operator=operator,
    )
    assert ready["reason"] == "OperatorIdentityNotAllowed"
    assert SELECTOR in degraded["message"]
    assert "spec.credentials" in degraded["message"]
    assert kube.get_secret(namespace, "trust-api") is None
    assert _requests_for(operator, scope) == 0

    # Labelled: served within seconds, without touching the TokenRequest.
    labelled_at = time.monotonic()
    _label(admin_api, namespace, "allowed")
    kube.wait_ready(namespace, "trust-api", timeout=LABEL_REACTION, operator=operator)
    reaction = time.monotonic() - labelled_at
    secret = kube.wait_secret(namespace, "trust-api")
    assert jwt_claims(secret.token)["sub"] == OPERATOR_CLIENT_ID
    assert _requests_for(operator, scope) == 1
    print(f"label added -> Ready in {reaction:.1f}s")

    # Label removed while the token is valid: it stays, nothing new is fetched, status says why.
    before_removal = operator.log_size()
    _label(admin_api, namespace, None)
    ready, degraded = wait_for(
        _not_allowed(kube, namespace, "trust-api", ready="True"),
        timeout=LABEL_REACTION,
        what="Degraded OperatorIdentityNotAllowed with the token kept",
        operator=operator,
    )
    assert "stays until it expires" in degraded["message"]
    after = kube.get_secret(namespace, "trust-api")
    assert after is not None
    assert after.token == secret.token
    assert after.resource_version == secret.resource_version
    assert _requests_for(operator, scope, since=before_removal) == 0
    # The second denial's event is posted after the status just seen: wait for it.
    events = kube.wait_events([namespace], {"OperatorIdentityNotAllowed": 2}, operator=operator)
    reasons = [event.reason for event in events]
    assert reasons.count("OperatorIdentityNotAllowed") == 2  # one per denial, not per look
    expected = "reason=OperatorIdentityNotAllowed"
    assert [line for line in log_problems(operator.log_text()) if expected not in line] == []


def test_without_a_selector_no_namespace_may_use_the_operator_identity(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    operator = start_operator(settings={"M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": ""})
    scope = _scope(namespace)
    kube.create_token_request(namespace, token_request("trust-api", scope=scope))
    _, degraded = wait_for(
        _not_allowed(kube, namespace, "trust-api", ready="False"),
        timeout=30,
        what="OperatorIdentityNotAllowed",
        operator=operator,
    )
    assert "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR is not set" in degraded["message"]
    assert _requests_for(operator, scope) == 0


# --- the seal key ------------------------------------------------------------------------


def _seal_key(admin_api: k8s.ApiClient) -> bytes:
    secret = k8s.CoreV1Api(admin_api).read_namespaced_secret(SEAL_KEY_SECRET, OPERATOR_NAMESPACE)
    return base64.b64decode((secret.data or {})["key"])


def test_a_token_sealed_with_another_key_is_not_reused(
    kube: Kube,
    namespace: str,
    admin_api: k8s.ApiClient,
    operator: OperatorProcess,
) -> None:
    scope = _scope(namespace)
    kube.create_token_request(namespace, token_request("trust-api", scope=scope))
    kube.wait_ready(namespace, "trust-api", operator=operator)
    first = kube.wait_secret(namespace, "trust-api")
    key_before = _seal_key(admin_api)
    assert len(key_before) == 32
    assert first.annotations["m2m.dev/seal"].startswith("v2:")

    # A new key while the operator is down (as if the key Secret had been lost): the
    # seals in the tenants' Secrets were made with the old one.
    assert operator.stop() == 0
    k8s.CoreV1Api(admin_api).delete_namespaced_secret(SEAL_KEY_SECRET, OPERATOR_NAMESPACE)
    restart_at = operator.log_size()
    operator.start()

    renewed = kube.wait_secret(namespace, "trust-api", unlike=first.token, operator=operator)
    assert _requests_for(operator, scope, since=restart_at) == 1
    assert "reusing the unexpired token" not in operator.log_text()[restart_at:]
    key_after = _seal_key(admin_api)
    assert len(key_after) == 32
    assert key_after != key_before
    assert renewed.annotations["m2m.dev/seal"] != first.annotations["m2m.dev/seal"]
    assert log_problems(operator.log_text()) == []


# --- the verifying front, on its own ----------------------------------------------------


def _service_account_token(
    admin_api: k8s.ApiClient, namespace: str, name: str, audience: str = FEDERATION_AUDIENCE
) -> str:
    core = k8s.CoreV1Api(admin_api)
    core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
    )
    answer = core.create_namespaced_service_account_token(
        name,
        namespace,
        k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[audience], expiration_seconds=600)
        ),
    )
    assert answer.status is not None
    return str(answer.status.token)


def _with_assertion(server: TokenServer, client_id: str, assertion: str) -> requests.Response:
    return requests.post(
        server.token_endpoint(),
        data={
            "client_id": client_id,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
            "grant_type": "client_credentials",
            "scope": "api://e2e.front.check/.default",
        },
        timeout=10,
    )


def _rejected_with(response: requests.Response, code: int) -> bool:
    body = response.json()
    return response.status_code == 401 and body["error_codes"] == [code]


def test_front_verifies_service_account_tokens_against_the_api_servers_jwks(
    federation: TokenServer, admin_api: k8s.ApiClient, namespace: str
) -> None:
    client_id = f"e2e-federated-{uuid.uuid4().hex[:8]}"
    federation.register_federated(client_id, f"system:serviceaccount:{namespace}:frontend")
    good = _service_account_token(admin_api, namespace, "frontend")

    accepted = _with_assertion(federation, client_id, good)
    assert accepted.status_code == 200, accepted.text
    claims = jwt_claims(accepted.json()["access_token"])
    assert claims["sub"] == client_id  # issued by mock-oauth2-server, to that client

    other_account = _service_account_token(admin_api, namespace, "other")
    assert _rejected_with(_with_assertion(federation, client_id, other_account), 70021)
    other_audience = _service_account_token(admin_api, namespace, "aud", audience="api://x")
    # Wrong audience, and (separately) a ServiceAccount of the right name that is not it.
    assert _rejected_with(_with_assertion(federation, client_id, other_audience), 700027)
    forged = jwt.encode(
        {**jwt.decode(good, options={"verify_signature": False})},
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
        headers={"kid": jwt.get_unverified_header(good).get("kid")},
    )
    assert _rejected_with(_with_assertion(federation, client_id, forged), 700027)


def test_front_verifies_private_key_jwt_and_refuses_a_replay(token_server: TokenServer) -> None:
    client_id = f"e2e-jwk-{uuid.uuid4().hex[:8]}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    token_server.register_jwk(client_id, {**public, "kid": "k1"})
    now = int(time.time())
    claims = {
        "aud": token_server.token_endpoint(),
        "iss": client_id,
        "sub": client_id,
        "jti": secrets.token_hex(8),
        "nbf": now,
        "iat": now,
        "exp": now + 300,
    }
    assertion = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
    accepted = _with_assertion(token_server, client_id, assertion)
    assert accepted.status_code == 200, accepted.text
    assert jwt_claims(accepted.json()["access_token"])["sub"] == client_id
    assert _rejected_with(_with_assertion(token_server, client_id, assertion), 700027)
    wrong_aud = jwt.encode(
        {**claims, "jti": secrets.token_hex(8), "aud": "https://login.microsoftonline.com/x"},
        key,
        algorithm="RS256",
    )
    assert _rejected_with(_with_assertion(token_server, client_id, wrong_aud), 700027)


# --- the admission policy of docs/security.md -----------------------------------------------


def _documented_policy() -> str:
    """The ValidatingAdmissionPolicy (and binding) exactly as docs/security.md shows it."""
    text = (REPO_ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    [policy] = [block for block in blocks if "kind: ValidatingAdmissionPolicy\n" in block]
    return str(policy)


@pytest.mark.usefixtures("operator_installed")
def test_the_documented_admission_policy_covers_target_and_scope(
    control_plane: Cluster, kube: Kube, namespace: str, admin_api: k8s.ApiClient
) -> None:
    policy = _documented_policy()
    assert "expression: \"'prod-gcp'\"" in policy
    applied = kubectl(
        control_plane,
        "apply",
        "-f",
        "-",
        stdin=policy.replace("expression: \"'prod-gcp'\"", f"expression: \"'{CLUSTER_NAME}'\""),
    )
    assert applied.returncode == 0, applied.stderr
    try:
        k8s.CoreV1Api(admin_api).patch_namespace(
            namespace, {"metadata": {"labels": {"m2m.dev/require-own-credentials": "true"}}}
        )
        own = {"credentials": {"secretRef": {"name": "azure-app"}}}

        def attempt(name: str, spec: dict[str, Any]) -> str | None:
            """None when admitted, else the denial message."""
            body = token_request(name)
            body["spec"] = spec
            try:
                kube.create_token_request(namespace, body)
            except k8s.ApiException as error:
                text = str(error.body)
                if "ValidatingAdmissionPolicy 'm2m-require-own-credentials'" not in text:
                    raise  # the CRD's own validation, say: not what this test is about
                return text
            kube.delete_token_request(namespace, name)
            return None

        # The policy takes effect within a second or two of its creation.
        wait_for(
            lambda: attempt("probe", {"scope": _scope(namespace)}) is not None,
            timeout=30,
            what="the admission policy to take effect",
        )
        target = {"application": "orders-api"}
        denied: dict[str, dict[str, Any]] = {
            "no-credentials": {"target": target},
            "other-namespace": {**own, "target": {**target, "namespace": "orders"}},
            "other-cluster": {**own, "target": {**target, "cluster": "prod-aws"}},
            "scope-other-namespace": {**own, "scope": "api://e2e.orders.orders-api/.default"},
            "scope-other-cluster": {
                **own,
                "scope": f"api://prod-aws.{namespace}.orders-api/.default",
            },
            "scope-not-an-app": {**own, "scope": f"api://e2e.{namespace}.a.b/.default"},
        }
        for name, spec in denied.items():
            message = attempt(name, spec)
            assert message is not None, f"{name} was admitted"
            assert "m2m-require-own-credentials" in message
        admitted: dict[str, dict[str, Any]] = {
            "own-target": {**own, "target": {**target, "namespace": namespace}},
            "own-cluster": {**own, "target": {**target, "cluster": CLUSTER_NAME}},
            "own-scope": {**own, "scope": f"api://e2e.{namespace}.orders-api/.default"},
        }
        for name, spec in admitted.items():
            assert attempt(name, spec) is None, f"{name} was denied"
    finally:
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            kubectl(control_plane, "delete", kind, "m2m-require-own-credentials")
