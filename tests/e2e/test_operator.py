"""The operator against the real control plane and the real token server.

The operator runs as a child process with its ServiceAccount's token and the
RBAC of `manifests/`, serving all namespaces (as the shipped Deployment does).
Each test has its own operator process and namespaces.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import kubernetes.client as k8s

from devenv.controlplane import Cluster
from devenv.operatorprocess import OperatorProcess
from devenv.tokenserver import SHORT_ISSUER, TokenServer, jwt_claims

from ._support import (
    API_VERSION,
    CLUSTER_NAME,
    GROUP,
    MANAGED_BY,
    OPERATOR_CLIENT_ID,
    PLURAL,
    VERSION,
    JsonObject,
    Kube,
    NamespaceFactory,
    OperatorFactory,
    SecretView,
    condition_of,
    credentials,
    kubectl,
    log_problems,
    parse_table,
    token_request,
    wait_for,
)

ORDERS = {"application": "orders-api", "namespace": "orders"}
ORDERS_SCOPE = f"api://{CLUSTER_NAME}.orders.orders-api/.default"
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
GC_TIMEOUT = 60.0


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _requests_for(operator: OperatorProcess, scope: str, *, since: int = 0) -> int:
    """How often the operator asked the token endpoint for `scope` (its debug log says so)."""
    return operator.log_text()[since:].count(f"requesting a token for scope {scope} ")


# --- the Secret and the status ------------------------------------------------------


def test_target_token_request_gets_secret_with_real_token(
    kube: Kube, namespace: str, operator: OperatorProcess, token_server: TokenServer
) -> None:
    created = kube.create_token_request(
        namespace, token_request("orders-api", target=ORDERS, secret_name="orders-api-token")
    )
    uid = created["metadata"]["uid"]

    body = kube.wait_ready(namespace, "orders-api", operator=operator)
    secret = kube.wait_secret(namespace, "orders-api-token", operator=operator)

    # The Secret, as the contract draws it.
    assert secret.raw.type == "Opaque"
    assert secret.labels[MANAGED_BY[0]] == MANAGED_BY[1]
    assert secret.labels["m2m.dev/token-request"] == "orders-api"
    references = [ref.to_dict() for ref in secret.metadata.owner_references or []]
    assert references == [
        {
            "api_version": API_VERSION,
            "kind": "TokenRequest",
            "name": "orders-api",
            "uid": uid,
            "controller": True,
            "block_owner_deletion": True,
        }
    ]
    data = secret.data
    assert set(data) == {"token", "token-type", "expires-at", "scope"}
    assert data["token-type"] == "Bearer"
    assert data["scope"] == ORDERS_SCOPE
    assert RFC3339_Z.match(data["expires-at"])
    assert secret.annotations["m2m.dev/expires-at"] == data["expires-at"]

    # A real JWT from the real token server, for the resolved scope, as the operator.
    claims = jwt_claims(secret.token)
    assert claims["aud"] == ORDERS_SCOPE
    assert claims["sub"] == OPERATOR_CLIENT_ID
    assert claims["iss"] == token_server.issuer_url()
    expires_at = parse_time(data["expires-at"])
    assert abs(expires_at.timestamp() - claims["exp"]) <= 2

    # The status.
    status = body["status"]
    assert status["observedGeneration"] == body["metadata"]["generation"] == 1
    assert status["scope"] == ORDERS_SCOPE
    assert status["secretName"] == "orders-api-token"
    assert status["expiresAt"] == data["expires-at"]
    assert status["failedAttempts"] == 0
    assert status.get("lastFailureTime") is None
    ready = condition_of(status, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "True",
        "TokenIssued",
        1,
    )
    degraded = condition_of(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("False", "RefreshSucceeded")
    # Refreshed when a third of the 3599 s remains, minus at most 30 s of jitter.
    refresh_at = parse_time(status["refreshAt"])
    issued_at = datetime.fromtimestamp(claims["iat"], UTC)
    lifetime = expires_at - issued_at
    assert RFC3339_Z.match(status["refreshAt"])
    earliest = issued_at + lifetime * 2 / 3 - timedelta(seconds=32)
    assert earliest <= refresh_at <= issued_at + lifetime * 2 / 3 + timedelta(seconds=2)

    # No finalizer: deletable while the operator is down.
    assert not body["metadata"].get("finalizers")

    # One event for the issued token, on the TokenRequest (posted after the status).
    posted = kube.wait_events([namespace], {"TokenIssued": 1}, operator=operator)
    events = [e for e in posted if e.involved_object.uid == uid]
    assert [(e.type, e.reason) for e in events] == [("Normal", "TokenIssued")]
    assert log_problems(operator.log_text()) == []
    # As installed, the process runs on uvloop (Kopf's CLI picks it): what the bench measured.
    assert "Event loop: uvloop" in operator.log_text()


def test_defaults_and_spec_change(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    """target.namespace defaults to the TokenRequest's, secretName to its name; a new
    secretName moves the token to a new Secret and removes the old one."""
    kube.create_token_request(
        namespace, token_request("billing", target={"application": "billing"})
    )
    kube.wait_ready(namespace, "billing", operator=operator)
    first = kube.wait_secret(namespace, "billing", operator=operator)
    scope = f"api://{CLUSTER_NAME}.{namespace}.billing/.default"
    assert first.data["scope"] == scope
    assert jwt_claims(first.token)["aud"] == scope

    kube.custom.patch_namespaced_custom_object(
        "m2m.dev", "v1alpha1", namespace, "tokenrequests", "billing",
        {"spec": {"secretName": "billing-token"}},
    )  # fmt: skip

    def moved() -> dict[str, object] | None:
        body = kube.get_token_request(namespace, "billing")
        status = (body or {}).get("status") or {}
        if status.get("observedGeneration") == 2 and status.get("secretName") == "billing-token":
            return status
        return None

    wait_for(moved, timeout=30, what="status for generation 2", operator=operator)
    second = kube.wait_secret(namespace, "billing-token", operator=operator)
    assert second.token == first.token  # same scope and identity: the cached token
    wait_for(
        lambda: kube.get_secret(namespace, "billing") is None,
        timeout=30,
        what="removal of the previous Secret",
        operator=operator,
    )
    assert log_problems(operator.log_text()) == []


def test_credentials_secret_identity(
    kube: Kube, namespace: str, operator: OperatorProcess, token_server: TokenServer
) -> None:
    """spec.credentials: the token is requested as the application of the Secret."""
    kube.create_secret(
        namespace,
        "azure-shop-frontend",
        credentials("e2e-shop-frontend", "e2e-frontend-secret-abc", token_server.token_endpoint()),
    )
    kube.create_token_request(
        namespace,
        token_request(
            "orders-as-frontend", target=ORDERS, credentials_secret="azure-shop-frontend"
        ),
    )
    kube.wait_ready(namespace, "orders-as-frontend", operator=operator)
    claims = jwt_claims(kube.wait_secret(namespace, "orders-as-frontend").token)
    assert claims["sub"] == "e2e-shop-frontend"
    assert claims["aud"] == ORDERS_SCOPE
    assert log_problems(operator.log_text()) == []


def test_credentials_secret_with_endpoint_not_allowed(
    kube: Kube, namespace: str, operator: OperatorProcess, token_server: TokenServer
) -> None:
    """A namespace cannot make the operator send a secret to a host not on the allow-list."""
    other_host = f"http://localhost:{token_server.port}/default/token"  # the same server
    kube.create_secret(
        namespace, "elsewhere", credentials("e2e-elsewhere", "e2e-elsewhere-secret", other_host)
    )
    kube.create_token_request(
        namespace, token_request("exfiltrate", scope=ORDERS_SCOPE, credentials_secret="elsewhere")
    )

    def refused() -> dict[str, object] | None:
        status = (kube.get_token_request(namespace, "exfiltrate") or {}).get("status") or {}
        ready = condition_of(status, "Ready")
        return ready if ready.get("reason") == "EndpointNotAllowed" else None

    ready = wait_for(refused, timeout=30, what="EndpointNotAllowed", operator=operator)
    assert ready["status"] == "False"
    assert kube.get_secret(namespace, "exfiltrate") is None
    assert "requesting a token" not in operator.log_text()


# --- refresh ----------------------------------------------------------------------


def test_short_lived_token_is_refreshed_before_it_expires(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    operator = start_operator(issuer=SHORT_ISSUER)  # 20 s tokens: refreshed after about 12 s
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    kube.wait_ready(namespace, "orders-api", operator=operator)

    tokens = [kube.wait_secret(namespace, "orders-api", operator=operator)]
    for _refresh in range(2):
        previous = tokens[-1]
        previous_expiry = parse_time(previous.data["expires-at"])
        assert previous_expiry - datetime.now(UTC) <= timedelta(seconds=20)
        ready_seen: list[str] = []

        def refreshed(
            previous_token: str = previous.token, ready_seen: list[str] = ready_seen
        ) -> SecretView | None:
            # Ready must stay True all along: the old token serves until the new one is in.
            status = (kube.get_token_request(namespace, "orders-api") or {}).get("status") or {}
            ready_seen.append(str(condition_of(status, "Ready").get("status")))
            secret = kube.get_secret(namespace, "orders-api")
            if secret is not None and secret.token != previous_token:
                return secret
            return None

        new = wait_for(refreshed, timeout=30, what="a refreshed token", operator=operator)
        assert datetime.now(UTC) < previous_expiry, "the token was replaced only after it expired"
        assert set(ready_seen) == {"True"}
        assert parse_time(new.data["expires-at"]) > previous_expiry
        assert jwt_claims(new.token)["aud"] == ORDERS_SCOPE
        tokens.append(new)

    # The status follows the Secret (it is written just after it).
    def status_follows() -> JsonObject | None:
        status = (kube.get_token_request(namespace, "orders-api") or {}).get("status") or {}
        secret = kube.get_secret(namespace, "orders-api")
        if secret is not None and status.get("expiresAt") == secret.data["expires-at"]:
            return status
        return None

    status = wait_for(status_follows, timeout=10, what="status.expiresAt of the Secret's token")
    assert condition_of(status, "Ready")["status"] == "True"
    assert parse_time(status["refreshAt"]) < parse_time(status["expiresAt"])
    # Each refresh is reported by an event, posted after the Secret and the status:
    # wait for the events themselves, the status matching is no sign they are listed yet.
    events = kube.wait_events([namespace], {"TokenRefreshed": 2}, operator=operator)
    reasons = [e.reason for e in events]
    assert reasons.count("TokenIssued") == 1
    assert log_problems(operator.log_text()) == []


# --- kubectl ----------------------------------------------------------------------


def test_kubectl_get_tokreq_columns(
    kube: Kube, namespace: str, operator: OperatorProcess, control_plane: Cluster
) -> None:
    kube.create_token_request(
        namespace, token_request("orders-api", target=ORDERS, secret_name="orders-api-token")
    )
    status = kube.wait_ready(namespace, "orders-api", operator=operator)["status"]

    result = kubectl(control_plane, "get", "tokreq", "-n", namespace)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "SECRET", "EXPIRES", "REFRESH", "AGE"]
    [row] = parse_table(result.stdout)
    assert row["NAME"] == "orders-api"
    assert row["READY"] == "True"
    assert row["SECRET"] == "orders-api-token"
    assert row["EXPIRES"] == status["expiresAt"]
    assert row["REFRESH"] == status["refreshAt"]
    assert re.fullmatch(r"\d+[smh]", row["AGE"])

    wide = kubectl(control_plane, "get", "tokenrequests.m2m.dev", "-n", namespace, "-o", "wide")
    assert wide.returncode == 0, wide.stderr
    [wide_row] = parse_table(wide.stdout)
    assert wide_row["SCOPE"] == ORDERS_SCOPE
    assert wide_row["REASON"] == "TokenIssued"
    assert {"READY", "SECRET", "EXPIRES", "REFRESH", "AGE"} <= set(wide_row)

    # The `m2m` category and `-A` list it too.
    everywhere = kubectl(control_plane, "get", "m2m", "-A")
    assert everywhere.returncode == 0, everywhere.stderr
    rows = [row for row in parse_table(everywhere.stdout) if row["NAMESPACE"] == namespace]
    assert [(row["NAME"], row["READY"]) for row in rows] == [("orders-api", "True")]


# --- one call for many ------------------------------------------------------------


def test_same_target_in_two_namespaces_shares_one_token(
    kube: Kube, new_namespace: NamespaceFactory, operator: OperatorProcess
) -> None:
    first, second = new_namespace(), new_namespace()
    for namespace in (first, second):
        kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    for namespace in (first, second):
        kube.wait_ready(namespace, "orders-api", operator=operator)

    secrets = [kube.wait_secret(namespace, "orders-api") for namespace in (first, second)]
    assert secrets[0].token == secrets[1].token  # one call served both
    assert secrets[0].data == secrets[1].data
    assert _requests_for(operator, ORDERS_SCOPE) == 1

    # A third one later is served from the cache: still one request.
    third = new_namespace()
    kube.create_token_request(third, token_request("orders-api", target=ORDERS))
    kube.wait_ready(third, "orders-api", operator=operator)
    assert kube.wait_secret(third, "orders-api").token == secrets[0].token
    assert _requests_for(operator, ORDERS_SCOPE) == 1
    assert log_problems(operator.log_text()) == []


# --- deletion ---------------------------------------------------------------------


def test_deleting_token_request_deletes_its_secret(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    kube.wait_ready(namespace, "orders-api", operator=operator)
    kube.wait_secret(namespace, "orders-api")

    kube.delete_token_request(namespace, "orders-api")

    assert kube.get_token_request(namespace, "orders-api") is None
    wait_for(
        lambda: kube.get_secret(namespace, "orders-api") is None,
        timeout=GC_TIMEOUT,
        what="garbage collection of the Secret",
    )
    operator.wait_for_log(rf"tokenrequest={namespace}/orders-api .*forgotten", timeout=10)
    assert log_problems(operator.log_text()) == []


def test_deleting_token_request_while_operator_is_down(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    body = kube.wait_ready(namespace, "orders-api", operator=operator)
    assert not body["metadata"].get("finalizers")
    kube.wait_secret(namespace, "orders-api")

    assert operator.stop() == 0
    kube.delete_token_request(namespace, "orders-api")

    # Gone at once: nothing waits for the operator.
    assert kube.get_token_request(namespace, "orders-api") is None
    # And its Secret goes through the owner reference alone.
    wait_for(
        lambda: kube.get_secret(namespace, "orders-api") is None,
        timeout=GC_TIMEOUT,
        what="garbage collection of the Secret while the operator is down",
    )


def test_token_request_being_deleted_is_no_longer_served(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """Another controller's finalizer keeps a deleted TokenRequest for a while: its Secret,
    removed meanwhile (as foreground deletion does), is not created again."""
    body = token_request("orders-api", target=ORDERS)
    body["metadata"]["finalizers"] = ["example.com/hold"]
    kube.create_token_request(namespace, body)
    kube.wait_ready(namespace, "orders-api", operator=operator)
    kube.wait_secret(namespace, "orders-api")
    try:
        kube.delete_token_request(namespace, "orders-api")  # only marked: the finalizer holds
        operator.wait_for_log(
            rf"tokenrequest={namespace}/orders-api .*forgotten \(being deleted\)", timeout=30
        )
        since = operator.log_size()
        kube.core.delete_namespaced_secret("orders-api", namespace)
        operator.wait_for_log(  # the label-selected watch delivered the deletion
            rf"Owned Secret {namespace}/orders-api: DELETED", timeout=30, since=since
        )
        # Served since: a later TokenRequest in the same namespace.
        kube.create_token_request(namespace, token_request("later", target=ORDERS))
        kube.wait_ready(namespace, "later", operator=operator)
        kube.wait_secret(namespace, "later")
        assert kube.get_secret(namespace, "orders-api") is None
    finally:
        kube.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "orders-api", {"metadata": {"finalizers": None}}
        )
    wait_for(
        lambda: kube.get_token_request(namespace, "orders-api") is None,
        timeout=30,
        what="the TokenRequest to go once released",
    )
    assert log_problems(operator.log_text()) == []


# --- restart ----------------------------------------------------------------------


def test_restart_reuses_the_token_in_the_secret(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    before = kube.wait_ready(namespace, "orders-api", operator=operator)
    secret_before = kube.wait_secret(namespace, "orders-api")

    assert operator.stop() == 0
    restart_at = operator.log_size()
    operator.start()

    operator.wait_for_log(
        rf"tokenrequest={namespace}/orders-api .*reusing the unexpired token found in its Secret",
        timeout=30,
        since=restart_at,
    )
    operator.wait_for_log(
        rf"tokenrequest={namespace}/orders-api .*looked at: Ready=",
        timeout=30,
        since=restart_at,
    )
    after = kube.get_token_request(namespace, "orders-api")
    secret_after = kube.get_secret(namespace, "orders-api")
    assert after is not None
    assert secret_after is not None
    # No call to the endpoint, no write to the Secret or the status.
    assert _requests_for(operator, ORDERS_SCOPE, since=restart_at) == 0
    assert secret_after.token == secret_before.token
    assert secret_after.resource_version == secret_before.resource_version
    assert after["status"] == before["status"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert log_problems(operator.log_text()) == []


def test_credentials_lost_while_down_keep_ready_while_the_secret_holds_a_token(
    kube: Kube, namespace: str, operator: OperatorProcess, token_server: TokenServer
) -> None:
    """Ready turns False only when no unexpired token remains, also right after a restart:
    the first look after it fails on the credentials with an empty cache."""
    kube.create_secret(
        namespace,
        "azure-shop-frontend",
        credentials("e2e-shop-frontend", "e2e-frontend-secret-abc", token_server.token_endpoint()),
    )
    kube.create_token_request(
        namespace,
        token_request(
            "orders-as-frontend", target=ORDERS, credentials_secret="azure-shop-frontend"
        ),
    )
    before = kube.wait_ready(namespace, "orders-as-frontend", operator=operator)
    secret_before = kube.wait_secret(namespace, "orders-as-frontend")

    assert operator.stop() == 0
    kube.core.delete_namespaced_secret("azure-shop-frontend", namespace)
    operator.start()

    def degraded() -> JsonObject | None:
        body = kube.get_token_request(namespace, "orders-as-frontend") or {}
        status: JsonObject = body.get("status") or {}
        reason = condition_of(status, "Degraded").get("reason")
        return status if reason == "CredentialsMissing" else None

    status = wait_for(degraded, timeout=30, what="Degraded CredentialsMissing", operator=operator)
    ready = condition_of(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "TokenIssued")
    assert condition_of(status, "Degraded")["status"] == "True"
    assert status["expiresAt"] == before["status"]["expiresAt"]
    secret_after = kube.get_secret(namespace, "orders-as-frontend")
    assert secret_after is not None
    assert secret_after.token == secret_before.token
    expected = [line for line in log_problems(operator.log_text()) if "CredentialsMissing" in line]
    assert expected  # the failure is reported, and nothing else went wrong
    assert [line for line in log_problems(operator.log_text()) if line not in expected] == []


def test_restart_with_a_token_due_for_refresh(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    """A token that became due while the operator was down is refreshed at once."""
    operator = start_operator(issuer=SHORT_ISSUER)
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))
    kube.wait_ready(namespace, "orders-api", operator=operator)
    first = kube.wait_secret(namespace, "orders-api")
    refresh_at = parse_time(kube.wait_ready(namespace, "orders-api")["status"]["refreshAt"])

    assert operator.stop() == 0
    wait_for(
        lambda: datetime.now(UTC) > refresh_at or None,
        timeout=30,
        what="the refresh point to pass while the operator is down",
    )
    operator.start()
    kube.wait_secret(namespace, "orders-api", unlike=first.token, timeout=15, operator=operator)
    assert log_problems(operator.log_text()) == []


# --- someone else's Secret --------------------------------------------------------


def test_secret_not_owned_is_left_alone(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    foreign = kube.create_secret(namespace, "taken", {"token": "not-yours"})
    kube.create_token_request(
        namespace, token_request("orders-api", target=ORDERS, secret_name="taken")
    )

    def conflict() -> dict[str, object] | None:
        status = (kube.get_token_request(namespace, "orders-api") or {}).get("status") or {}
        ready = condition_of(status, "Ready")
        return ready if ready.get("reason") == "SecretConflict" else None

    ready = wait_for(conflict, timeout=30, what="SecretConflict", operator=operator)
    assert ready["status"] == "False"
    after = kube.get_secret(namespace, "taken")
    assert after is not None
    assert after.resource_version == foreign.resource_version
    assert after.data == {"token": "not-yours"}

    # Once the other Secret is gone, the TokenRequest gets its own.
    kube.core.delete_namespaced_secret("taken", namespace)
    kube.wait_ready(namespace, "orders-api", operator=operator)
    assert kube.wait_secret(namespace, "taken").data["scope"] == ORDERS_SCOPE
    events = kube.wait_events([namespace], {"SecretConflict": 1, "TokenIssued": 1})
    warnings = [e.reason for e in events if e.type == "Warning"]
    assert warnings == ["SecretConflict"]


# --- the API server refuses the Secret ---------------------------------------------


def test_secret_write_refused_by_the_api_server_is_reported_and_retried(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """A quota of zero Secrets makes the real API server answer 403 to the create."""
    quota = k8s.V1ResourceQuota(
        metadata=k8s.V1ObjectMeta(name="no-secrets"),
        spec=k8s.V1ResourceQuotaSpec(hard={"count/secrets": "0"}),
    )
    kube.core.create_namespaced_resource_quota(namespace, quota)
    kube.create_token_request(namespace, token_request("orders-api", target=ORDERS))

    def refused() -> dict[str, object] | None:
        status = (kube.get_token_request(namespace, "orders-api") or {}).get("status") or {}
        degraded = condition_of(status, "Degraded")
        return degraded if degraded.get("reason") == "SecretWriteFailed" else None

    degraded = wait_for(refused, timeout=30, what="SecretWriteFailed", operator=operator)
    assert degraded["status"] == "True"
    assert "HTTP 403" in str(degraded["message"])
    status = (kube.get_token_request(namespace, "orders-api") or {})["status"]
    assert condition_of(status, "Ready")["status"] == "False"
    assert kube.get_secret(namespace, "orders-api") is None

    # The quota goes: the next attempt writes the token already fetched, without a new request.
    kube.core.delete_namespaced_resource_quota("no-secrets", namespace)
    kube.wait_ready(namespace, "orders-api", timeout=60, operator=operator)
    assert kube.wait_secret(namespace, "orders-api").data["scope"] == ORDERS_SCOPE
    log = operator.log_text()
    assert (
        log.count(f"tokenrequest={namespace}/orders-api scope={ORDERS_SCOPE} token obtained") == 1
    )
    expected = [line for line in log_problems(log) if "reason=SecretWriteFailed" in line]
    assert expected
    assert all("HTTP 403 Forbidden" in line for line in expected)
    assert [line for line in log_problems(log) if line not in expected] == []
