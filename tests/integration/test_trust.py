"""The operator's own identity, only in namespaces the selector grants it to.

The operator's Namespace watch runs against the real API server here, with the
operator in this process; tests/e2e/test_trust.py runs it as a process.
"""

from __future__ import annotations

import contextlib
from typing import Any

import kubernetes

from ._token_endpoint import TokenEndpoint
from .harness import Kube, OperatorFactory, wait_for
from .test_failures import (
    NAME,
    NS,
    TARGET,
    by_type,
    events,
    secret_tokens,
    token_in_secret,
    wait_condition,
)

LABEL = "m2m.dev/operator-identity"
SELECTOR = {"M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": f"{LABEL}=allowed"}


def label(kube: Kube, value: str | None) -> None:
    kube.core.patch_namespace(kube.ns(NS), {"metadata": {"labels": {LABEL: value}}})


async def test_a_namespace_gets_and_loses_the_operator_identity_with_its_label(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    operator = operator_factory.start(env=SELECTOR)
    kube.create_token_request(NS, NAME, TARGET)
    denied = await wait_condition(kube, "Ready", "False", "OperatorIdentityNotAllowed")
    assert by_type(denied)["Degraded"]["status"] == "True"
    assert f"'{LABEL}=allowed'" in by_type(denied)["Degraded"]["message"]
    assert token_endpoint.count == 0
    assert kube.read_secret(NS, NAME) is None

    label(kube, "allowed")
    await wait_condition(kube, "Ready", "True", "TokenIssued")
    token = token_in_secret(kube)
    assert token_endpoint.count == 1

    label(kube, None)
    kept: dict[str, Any] = await wait_condition(
        kube, "Degraded", "True", "OperatorIdentityNotAllowed"
    )
    assert by_type(kept)["Ready"]["status"] == "True"  # the token in the Secret still serves
    assert "stays until it expires" in by_type(kept)["Degraded"]["message"]
    assert token_in_secret(kube) == token
    assert len(secret_tokens(kube)) == 1  # the Secret was written once, never again
    assert token_endpoint.count == 1

    # Granted again: the token in the Secret is taken back (its seal verifies), no call.
    label(kube, "allowed")
    await wait_condition(kube, "Degraded", "False", "RefreshSucceeded")
    assert token_endpoint.count == 1
    assert len(secret_tokens(kube)) == 1
    # Events follow their look's status in the background: wait for the second one.
    await wait_for(
        lambda: events(kube).count("OperatorIdentityNotAllowed") == 2,
        message="two OperatorIdentityNotAllowed events",
    )
    operator.assert_never_logged(token or "never-empty")


async def test_the_denial_survives_a_restart_without_a_write(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    operator_factory.start(env=SELECTOR)
    kube.create_token_request(NS, NAME, TARGET)
    before = await wait_condition(kube, "Ready", "False", "OperatorIdentityNotAllowed")

    restarted = operator_factory.restart(env=SELECTOR)
    await wait_for(
        lambda: "still not served: reason=OperatorIdentityNotAllowed" in restarted.all_text,
        message="the restarted operator's look at the TokenRequest",
    )
    assert kube.read_status(NS, NAME) == before  # no status write: the same failure, same time
    assert token_endpoint.count == 0


OPERATOR_NAMESPACE = "m2m-token-operator"  # devenv.install's; the operator's default
SEAL_KEY_SECRET = "m2m-token-operator-seal-key"


async def test_token_requests_in_the_operators_own_namespace_are_refused_unread(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    """Issue 18: there a secretRef names the operator's identity, a secretName its seal key.

    Created in the real operator namespace (not one of the test's), so removed at the end.
    """
    group, version, plural = "m2m.dev", "v1alpha1", "tokenrequests"
    seal_before = kube.core.read_namespaced_secret(SEAL_KEY_SECRET, OPERATOR_NAMESPACE).metadata
    identity: Any = {
        "metadata": {"name": "identity-copy"},
        "stringData": {
            "AZURE_APP_CLIENT_ID": "its-client",
            "AZURE_APP_CLIENT_SECRET": "its-secret",
            "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": token_endpoint.url,
        },
    }
    refused = {
        "by-ref": {
            "scope": "api://by-ref/.default",
            "credentials": {"secretRef": {"name": "identity-copy"}},
        },
        "seal-name": {"scope": "api://seal-name/.default", "secretName": SEAL_KEY_SECRET},
        "own": {"scope": "api://own/.default"},
    }
    kube.core.create_namespaced_secret(OPERATOR_NAMESPACE, identity)
    try:
        for name, spec in refused.items():
            body: Any = {
                "apiVersion": f"{group}/{version}",
                "kind": "TokenRequest",
                "metadata": {"name": name},
                "spec": spec,
            }
            kube.custom.create_namespaced_custom_object(
                group, version, OPERATOR_NAMESPACE, plural, body
            )
        operator_factory.start()
        kube.create_token_request(NS, NAME, TARGET)  # elsewhere: served as usual
        await wait_condition(kube, "Ready", "True", "TokenIssued", timeout=15)

        for name in refused:

            def reason(name: str = name) -> Any:
                found: Any = kube.custom.get_namespaced_custom_object(
                    group, version, OPERATOR_NAMESPACE, plural, name
                )
                conditions = by_type(found.get("status") or {})
                degraded = conditions.get("Degraded") or {}
                return degraded if degraded.get("reason") == "OperatorNamespaceNotServed" else None

            degraded = await wait_for(reason, message=f"{name} refused")
            assert degraded["status"] == "True"
            assert "operator's own namespace" in degraded["message"]

        # The refusing looks wrote their status last: had they read or written a Secret,
        # or asked for a token, it would show by now. One token request: the other namespace's.
        assert token_endpoint.count == 1
        secret_calls = kube.requests(path=rf"/namespaces/{OPERATOR_NAMESPACE}/secrets")
        # Only the seal key, read once at start (it exists: the session's fixture made it).
        assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in secret_calls] == [
            ("GET", SEAL_KEY_SECRET)
        ]
        seal_after = kube.core.read_namespaced_secret(SEAL_KEY_SECRET, OPERATOR_NAMESPACE).metadata
        assert seal_before is not None
        assert seal_after is not None
        assert seal_after.resource_version == seal_before.resource_version
        listed = kube.core.list_namespaced_secret(OPERATOR_NAMESPACE).items
        names = {s.metadata.name for s in listed if s.metadata is not None}
        assert names.isdisjoint({"by-ref", "own"}), names
    finally:
        for name in refused:
            with contextlib.suppress(kubernetes.client.ApiException):
                kube.custom.delete_namespaced_custom_object(
                    group, version, OPERATOR_NAMESPACE, plural, name
                )
        kube.core.delete_namespaced_secret("identity-copy", OPERATOR_NAMESPACE)


async def test_a_grant_revoked_during_the_fetch_gets_no_token_written(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    operator = operator_factory.start(env=SELECTOR)
    kube.ensure_namespace(NS)
    label(kube, "allowed")
    namespace = kube.ns(NS)
    await wait_for(
        lambda: f"Namespace {namespace} may use the operator's own identity" in operator.all_text,
        message="the grant seen by the operator",
    )
    token_endpoint.pause()
    kube.create_token_request(NS, NAME, TARGET)
    await wait_for(lambda: token_endpoint.count == 1, message="the token request held")
    # Revoked while the token request is in flight; the operator sees it before the answer.
    label(kube, None)
    await wait_for(
        lambda: (
            f"Namespace {namespace} may no longer use the operator's own identity"
            in operator.all_text
        ),
        message="the revocation seen by the operator",
    )
    token_endpoint.resume()
    denied = await wait_condition(kube, "Ready", "False", "OperatorIdentityNotAllowed")
    assert by_type(denied)["Degraded"]["reason"] == "OperatorIdentityNotAllowed"
    assert kube.read_secret(NS, NAME) is None  # the freshly minted token was never written
    assert secret_tokens(kube) == []
    assert token_endpoint.count == 1
