"""The e2e harness itself works: what the operator's e2e tests take for granted.

If one of these fails, every other e2e failure is noise: the control plane is
not answering, the garbage collector (which removes a deleted TokenRequest's
Secret) is not running, RBAC is not enforced, or the token server is down.
"""

from __future__ import annotations

import time

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from devenv.controlplane import Cluster, new_api_client
from devenv.tokenserver import SHORT_ISSUER, SHORT_TOKEN_EXPIRY, TokenServer, jwt_claims

pytestmark = pytest.mark.e2e

GC_TIMEOUT = 30.0


def test_apiserver_answers(admin_api: k8s.ApiClient) -> None:
    version = k8s.VersionApi(admin_api).get_code()
    assert version.major == "1"


def test_namespace_can_be_created(admin_api: k8s.ApiClient, namespace: str) -> None:
    created = k8s.CoreV1Api(admin_api).read_namespace(namespace)
    assert created.status is not None
    assert created.status.phase == "Active"


def test_dependent_of_deleted_owner_is_garbage_collected(
    admin_api: k8s.ApiClient, namespace: str
) -> None:
    core = k8s.CoreV1Api(admin_api)
    owner = core.create_namespaced_config_map(
        namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="owner"))
    )
    assert owner.metadata is not None
    assert owner.metadata.uid
    reference = k8s.V1OwnerReference(
        api_version="v1",
        kind="ConfigMap",
        name="owner",
        uid=owner.metadata.uid,
        controller=True,
    )
    core.create_namespaced_secret(
        namespace,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="dependent", owner_references=[reference]),
            string_data={"token": "x"},
        ),
    )
    assert _secret_exists(core, namespace, "dependent")
    core.delete_namespaced_config_map("owner", namespace)

    deadline = time.monotonic() + GC_TIMEOUT
    while _secret_exists(core, namespace, "dependent"):
        if time.monotonic() > deadline:
            pytest.fail(f"the garbage collector left the dependent Secret for {GC_TIMEOUT}s")
        time.sleep(0.5)


def _secret_exists(core: k8s.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_secret(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def test_service_account_without_rbac_is_forbidden(
    control_plane: Cluster, admin_api: k8s.ApiClient, namespace: str
) -> None:
    k8s.CoreV1Api(admin_api).create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="no-rights"))
    )
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "no-rights")

    with new_api_client(kubeconfig) as api:
        # Authenticated (not 401): the token from the TokenRequest API is accepted ...
        review = k8s.AuthenticationV1Api(api).create_self_subject_review(k8s.V1SelfSubjectReview())
        assert review.status is not None
        assert review.status.user_info is not None
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:no-rights"
        # ... and authorized for nothing it was not granted.
        with pytest.raises(ApiException) as forbidden:
            k8s.CoreV1Api(api).list_namespaced_secret(namespace)
    assert forbidden.value.status == 403


def test_token_server_issues_client_credentials_tokens(token_server: TokenServer) -> None:
    scope = "api://c.ns.app/.default"
    response = token_server.request_token(client_id="app", client_secret="s", scope=scope)

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert 3590 <= int(body["expires_in"]) <= 3600
    claims = jwt_claims(body["access_token"])
    assert claims["aud"] == scope
    assert claims["sub"] == "app"
    assert claims["iss"] == token_server.issuer_url()


def test_token_server_short_issuer_and_errors(token_server: TokenServer) -> None:
    short = token_server.request_token(
        client_id="app", client_secret="s", scope="api://x/.default", issuer=SHORT_ISSUER
    )
    assert short.status_code == 200
    assert SHORT_TOKEN_EXPIRY - 2 <= int(short.json()["expires_in"]) <= SHORT_TOKEN_EXPIRY

    rejected = token_server.request_token(client_id="app", client_secret="", scope="x")
    assert rejected.status_code == 401
    assert rejected.json()["error"] == "invalid_client"
