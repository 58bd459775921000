"""The operator's failure paths, end to end through Kopf: one test per behaviour.

The token endpoint fails, throttles, rejects; credentials Secrets are missing,
incomplete, point elsewhere or belong to another namespace; specs are invalid.
Each test checks what a user sees (status, events, the Secret), what the
token endpoint receives, and that no secret or token leaks on the way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from devenv.faultproxy import Fail, Rule

from .harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    CLUSTER_NAME,
    SECRETS,
    TOKEN_REQUESTS,
    Kube,
    OperatorFactory,
    OperatorRun,
    Reply,
    TokenCall,
    TokenEndpoint,
    wait_for,
)

NS = "shop"
NAME = "orders-api"
SCOPE = f"api://{CLUSTER_NAME}.orders.orders-api/.default"
TARGET = {"target": {"application": "orders-api", "namespace": "orders"}}
CREDENTIALS = "azure-shop-frontend"
# operator_env's M2M_RETRY_INITIAL_SECONDS: a transient failure is retried this soon.
RETRY_INITIAL_SECONDS = 0.2

# A refresh about 1-2 s after issue of a 60 s token: room to fail, observe and recover
# long before the token expires. refreshBefore 58s puts the refresh 2 s after issue;
# these settings lift the clamps and the jitter that would move it.
FAST_REFRESH_ENV = {"M2M_MIN_REFRESH_INTERVAL_SECONDS": "0", "M2M_REFRESH_JITTER_SECONDS": "0"}
FAST_REFRESH_SPEC = {**TARGET, "refreshBefore": "58s"}
FAST_REFRESH_LIFETIME = 60

AADSTS7000215 = (
    "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request"
    " is the client secret value, not the client secret ID"
)
AADSTS70011 = (
    "AADSTS70011: The provided request must include a 'scope' input parameter. The provided"
    " value for the input parameter 'scope' is not valid"
)


# ---- helpers ---------------------------------------------------------------------------------


def conditions(kube: Kube, name: str = NAME, namespace: str = NS) -> dict[str, dict[str, Any]]:
    status = kube.read_status(namespace, name) or {}
    return {c["type"]: c for c in status.get("conditions") or []}


async def wait_condition(
    kube: Kube,
    type_: str,
    status: str,
    reason: str | None = None,
    *,
    name: str = NAME,
    namespace: str = NS,
    timeout: float = 5.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
) -> dict[str, Any]:
    """Wait until a condition has this status (and reason); return the whole TokenRequest status."""

    def matches() -> dict[str, Any] | None:
        current = kube.read_status(namespace, name) or {}
        by_type = {c["type"]: c for c in current.get("conditions") or []}
        condition = by_type.get(type_)
        if condition is None or condition["status"] != status:
            return None
        if reason is not None and condition["reason"] != reason:
            return None
        return current

    what = f"{namespace}/{name} {type_}={status}" + (f" ({reason})" if reason else "")
    return await wait_for(matches, timeout=timeout, message=what)


def by_type(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


def status_history(kube: Kube, name: str = NAME, namespace: str = NS) -> list[dict[str, Any]]:
    """Every stored status of the TokenRequest, oldest first (each write that changed it)."""
    return [
        dict(version.get("status") or {})
        for version in kube.versions(TOKEN_REQUESTS, namespace, name)
        if version is not None
    ]


def secret_tokens(kube: Kube, name: str = NAME, namespace: str = NS) -> list[str | None]:
    """The token of every stored version of a Secret, oldest first."""
    tokens: list[str | None] = []
    for version in kube.versions(SECRETS, namespace, name):
        encoded = ((version or {}).get("data") or {}).get("token")
        tokens.append(base64.b64decode(encoded).decode() if encoded else None)
    return tokens


def create_identity(kube: Kube, token_endpoint: TokenEndpoint, app: str) -> None:
    """The credentials Secret CREDENTIALS for client `app` (secret `<app>-s3cr3t`).

    Labelled m2m.dev/credentials=true: watched, so its deletion and re-creation wake
    the TokenRequest at once (unlabelled ones are found on the retry schedule).
    """
    kube.create_secret(
        NS,
        CREDENTIALS,
        {
            "AZURE_APP_CLIENT_ID": app,
            "AZURE_APP_CLIENT_SECRET": f"{app}-s3cr3t",
            "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": token_endpoint.url,
        },
        labels={"m2m.dev/credentials": "true"},
    )


def token_in_secret(kube: Kube, name: str = NAME, namespace: str = NS) -> str | None:
    return (kube.read_secret(namespace, name) or {}).get("token")


def fail_status_writes(kube: Kube, status: int, *, times: int = 1) -> Rule:
    """The next ``times`` status writes of the operator fail with ``status`` (the proxy answers)."""
    return kube.proxy.add(
        Rule(Fail(status), method="PATCH", path=r"/tokenrequests/[^/]+/status$", times=times)
    )


async def observe(window: float) -> None:
    """Let ``window`` seconds pass before asserting that something did *not* happen.

    Only for absences with no positive signal to wait for; every caller derives
    ``window`` from the settings under test and says how.
    """
    await asyncio.sleep(window)


def events(kube: Kube, name: str = NAME, namespace: str = NS) -> list[str]:
    return [e["reason"] for e in kube.events_for(namespace, name)]


def warnings(kube: Kube, name: str = NAME, namespace: str = NS) -> list[str]:
    return [e["reason"] for e in kube.events_for(namespace, name) if e["type"] == "Warning"]


def failed_calls(endpoint: TokenEndpoint) -> list[TokenCall]:
    return [call for call in endpoint.calls if call.status != 200]


class Listener:
    """A TCP port that records whether anybody connected, without ever answering."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((host, 0))
        self._socket.listen(8)
        self._socket.settimeout(0.05)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="listener")
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._socket.close()


@contextlib.contextmanager
def listening(host: str = "127.0.0.1") -> Iterator[Listener]:
    listener = Listener(host)
    try:
        yield listener
    finally:
        listener.close()


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ---- 1. a failing refresh keeps the old token, then recovers ---------------------------------


@pytest.mark.parametrize(
    ("failure", "shown"),
    [
        pytest.param(
            Reply.oauth_error(503, "temporarily_unavailable", error_codes=(90033,)),
            "HTTP 503",
            id="503-without-retry-after",
        ),
        pytest.param(
            Reply.raw(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
            "HTTP 502",
            id="html-502",
        ),
    ],
)
async def test_failing_refresh_keeps_the_old_token_and_recovers(
    kube: Kube,
    token_endpoint: TokenEndpoint,
    operator_factory: OperatorFactory,
    failure: Reply,
    shown: str,
) -> None:
    token_endpoint.expires_in = FAST_REFRESH_LIFETIME
    operator_factory.start(env=FAST_REFRESH_ENV)
    kube.create_token_request(NS, NAME, FAST_REFRESH_SPEC)
    issued = await wait_condition(kube, "Ready", "True")
    first = token_in_secret(kube)
    assert first == token_endpoint.tokens[0]

    token_endpoint.always(failure)  # from the refresh on, about 1-2 s after issue
    degraded = await wait_condition(kube, "Degraded", "True", "EndpointUnavailable")
    assert by_type(degraded)["Ready"]["status"] == "True"
    assert by_type(degraded)["Ready"]["reason"] == "TokenIssued"
    assert degraded["failedAttempts"] >= 1
    assert degraded["lastFailureTime"]
    assert degraded["expiresAt"] == issued["expiresAt"]  # still the first token's expiry
    assert shown in by_type(degraded)["Degraded"]["message"]
    assert token_in_secret(kube) == first

    # Retries keep failing (backoff 0.2 s, 0.4 s, ...): the old token keeps serving.
    await wait_for(lambda: len(failed_calls(token_endpoint)) >= 2, message="two failed calls")
    assert token_in_secret(kube) == first

    token_endpoint.always(Reply.ok())
    second = await wait_for(
        lambda: (token := token_in_secret(kube)) != first and token, message="a new token"
    )
    recovered = await wait_condition(kube, "Degraded", "False", "RefreshSucceeded")
    assert by_type(recovered)["Ready"]["status"] == "True"
    assert recovered["failedAttempts"] == 0
    assert not recovered.get("lastFailureTime")
    assert recovered["expiresAt"] > issued["expiresAt"]
    assert second == token_endpoint.tokens[-1]

    # Throughout: never Ready=False, attempts counted up, and the Secret went first -> second.
    history = status_history(kube)
    assert all(by_type(s)["Ready"]["status"] == "True" for s in history if s.get("conditions"))
    attempts = [s["failedAttempts"] for s in history if s.get("failedAttempts")]
    assert attempts == sorted(attempts)
    assert max(attempts) >= 2
    assert secret_tokens(kube) == [first, second]


# ---- 2. no token yet and the endpoint failing ------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    ["503", "connection-dropped", "nothing-listening"],
)
async def test_no_token_and_failing_endpoint_is_not_ready(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory, failure: str
) -> None:
    env: dict[str, str] = {}
    if failure == "503":
        token_endpoint.always(Reply.oauth_error(503, "temporarily_unavailable"))
    elif failure == "connection-dropped":
        token_endpoint.always(Reply.dropped())
    else:
        env["AZURE_OPENID_CONFIG_TOKEN_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}/token"
    operator_factory.start(env=env)
    kube.create_token_request(NS, NAME, TARGET)

    status = await wait_condition(kube, "Ready", "False", "EndpointUnavailable")
    assert by_type(status)["Degraded"]["status"] == "True"
    assert by_type(status)["Degraded"]["reason"] == "EndpointUnavailable"
    assert status["failedAttempts"] >= 1
    assert status["lastFailureTime"]
    assert not status.get("expiresAt")
    assert kube.read_secret(NS, NAME) is None
    # It keeps trying (a transient failure), still without a token.
    await wait_for(
        lambda: (kube.read_status(NS, NAME) or {}).get("failedAttempts", 0) >= 2,
        message="a second failed attempt",
    )
    if failure != "nothing-listening":
        assert token_endpoint.count >= 2  # and it really was the endpoint that failed
    assert kube.read_secret(NS, NAME) is None
    assert conditions(kube)["Ready"]["status"] == "False"


# ---- 3. rejected credentials or scope: one event, no hammering -------------------------------


@pytest.mark.parametrize(
    ("rejection", "reason"),
    [
        pytest.param(
            Reply.oauth_error(401, "invalid_client", AADSTS7000215, error_codes=(7000215,)),
            "CredentialsRejected",
            id="invalid_client",
        ),
        pytest.param(
            Reply.oauth_error(400, "invalid_scope", AADSTS70011, error_codes=(70011,)),
            "ScopeRejected",
            id="invalid_scope",
        ),
    ],
)
async def test_permanent_rejection_is_reported_once_and_not_retried(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun, rejection: Reply, reason: str
) -> None:
    token_endpoint.always(rejection)
    kube.create_token_request(NS, NAME, TARGET)

    status = await wait_condition(kube, "Ready", "False", reason)
    assert by_type(status)["Degraded"]["reason"] == reason
    assert status["failedAttempts"] == 1
    await wait_for(lambda: warnings(kube) == [reason], message=f"a {reason} Warning")

    # Held (M2M_PERMANENT_FAILURE_HOLD_SECONDS, 300 s). Were it treated as transient, the
    # backoff (RETRY_INITIAL_SECONDS, doubling) would retry at 0.2 s and 0.6 s: a window of
    # five initial backoffs holds at least two such retries.
    await observe(5 * RETRY_INITIAL_SECONDS)
    assert token_endpoint.count == 1
    assert warnings(kube) == [reason]
    assert len(kube.events_for(NS, NAME)) == 1
    assert kube.read_secret(NS, NAME) is None
    assert conditions(kube)["Ready"]["reason"] == reason


# ---- 4. throttling honours Retry-After --------------------------------------------------------


async def test_throttled_request_waits_for_retry_after(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    token_endpoint.program(Reply.oauth_error(429, "throttled", error_codes=(), retry_after=2))
    kube.create_token_request(NS, NAME, TARGET)

    status = await wait_condition(kube, "Ready", "False", "Throttled")
    assert token_endpoint.count == 1  # reported while waiting, before any second call
    assert "Retry-After=2s" in by_type(status)["Degraded"]["message"]

    calls = await token_endpoint.wait_for_calls(2, timeout=5)
    waited = calls[1].received_at - calls[0].received_at
    assert waited >= 2.0, f"the retry came {waited:.2f}s after the 429 with Retry-After: 2"
    # And not much later: Retry-After, not the 300 s hold of a permanent failure (a
    # generous margin for a loaded machine).
    assert waited < 10.0
    await wait_condition(kube, "Ready", "True", "TokenIssued")
    assert token_in_secret(kube) == calls[1].access_token


# ---- 5. credentials Secret missing, then created ---------------------------------------------


@pytest.mark.parametrize("opted_in", [True, False], ids=["labelled", "unlabelled"])
async def test_missing_credentials_secret_recovers_once_created(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun, opted_in: bool
) -> None:
    kube.create_token_request(
        NS, NAME, {**TARGET, "credentials": {"secretRef": {"name": CREDENTIALS}}}
    )
    status = await wait_condition(kube, "Ready", "False", "CredentialsMissing")
    assert CREDENTIALS in by_type(status)["Ready"]["message"]
    # The look that reported it found no credentials before it could fetch anything.
    assert token_endpoint.count == 0

    # Only the Secret appears; nobody touches the TokenRequest. Labelled
    # m2m.dev/credentials=true it is watched and brings recovery at once (after the
    # 1 s debounce); unlabelled it is found by the retry schedule (5 s after the
    # failure), never by the 300 s hold of a permanent failure.
    kube.create_secret(
        NS,
        CREDENTIALS,
        {
            "AZURE_APP_CLIENT_ID": "shop-frontend-client",
            "AZURE_APP_CLIENT_SECRET": "shop-frontend-s3cr3t",
            "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": token_endpoint.url,
        },
        labels={"m2m.dev/credentials": "true"} if opted_in else None,
    )
    status = await wait_condition(
        kube, "Ready", "True", "TokenIssued", timeout=4.0 if opted_in else 10.0
    )
    assert by_type(status)["Degraded"]["reason"] == "RefreshSucceeded"
    assert status["failedAttempts"] == 0
    assert token_endpoint.count == 1
    form = token_endpoint.calls[-1].form
    assert form["client_id"] == "shop-frontend-client"
    assert form["client_secret"] == "shop-frontend-s3cr3t"
    assert form["scope"] == SCOPE
    assert token_in_secret(kube) == token_endpoint.tokens[-1]
    stored = kube.read_token_request(NS, NAME)
    assert stored is not None
    assert stored["metadata"]["generation"] == 1


@pytest.mark.parametrize("problem", ["key-missing", "value-empty"])
async def test_incomplete_credentials_secret_is_credentials_missing(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun, problem: str
) -> None:
    data = {
        "AZURE_APP_CLIENT_ID": "shop-frontend-client",
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": token_endpoint.url,
    }
    if problem == "value-empty":
        data["AZURE_APP_CLIENT_SECRET"] = ""
    kube.create_secret(NS, CREDENTIALS, data)
    kube.create_token_request(
        NS, NAME, {**TARGET, "credentials": {"secretRef": {"name": CREDENTIALS}}}
    )

    status = await wait_condition(kube, "Ready", "False", "CredentialsMissing")
    assert "AZURE_APP_CLIENT_SECRET" in by_type(status)["Ready"]["message"]
    # The look that reported it found no complete credentials before it could fetch anything.
    assert token_endpoint.count == 0

    # The owner of the Secret completes it: the watch brings the token.
    kube.patch_secret(
        NS, CREDENTIALS, {"stringData": {"AZURE_APP_CLIENT_SECRET": "shop-frontend-s3cr3t"}}
    )
    await wait_condition(kube, "Ready", "True", "TokenIssued")
    assert token_endpoint.count == 1
    assert token_endpoint.calls[-1].form["client_secret"] == "shop-frontend-s3cr3t"


async def test_credentials_secret_gone_keeps_the_token_until_another_identity_replaces_it(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    create_identity(kube, token_endpoint, "first-app")
    kube.create_token_request(
        NS, NAME, {**TARGET, "credentials": {"secretRef": {"name": CREDENTIALS}}}
    )
    await wait_condition(kube, "Ready", "True")
    first = token_in_secret(kube)
    assert first == token_endpoint.tokens[0]

    # The Secret disappears: the token in hand still serves, the problem is reported.
    kube.delete_secret(NS, CREDENTIALS)
    status = await wait_condition(kube, "Degraded", "True", "CredentialsMissing")
    assert by_type(status)["Ready"]["status"] == "True"
    assert status["failedAttempts"] >= 1
    assert token_in_secret(kube) == first

    # It comes back as another identity: the Secret must get that identity's token, not
    # keep serving the token of an identity the TokenRequest no longer uses.
    create_identity(kube, token_endpoint, "second-app")
    await wait_for(
        lambda: token_in_secret(kube) not in (None, first), message="the new identity's token"
    )
    status = await wait_condition(kube, "Degraded", "False", "RefreshSucceeded")
    assert by_type(status)["Ready"]["status"] == "True"
    assert token_endpoint.count == 2
    assert token_endpoint.calls[-1].form["client_id"] == "second-app"
    assert token_endpoint.calls[-1].form["client_secret"] == "second-app-s3cr3t"
    assert token_in_secret(kube) == token_endpoint.tokens[-1]


async def test_identity_changed_while_the_operator_was_down_gets_a_new_token(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    """After a restart the Secret's token is reused only for the identity it was issued to."""
    create_identity(kube, token_endpoint, "first-app")
    run = operator_factory.start()
    kube.create_token_request(
        NS, NAME, {**TARGET, "credentials": {"secretRef": {"name": CREDENTIALS}}}
    )
    await wait_condition(kube, "Ready", "True")
    first = token_in_secret(kube)
    run.stop()

    kube.delete_secret(NS, CREDENTIALS)
    create_identity(kube, token_endpoint, "second-app")
    operator_factory.start()
    await wait_for(
        lambda: token_in_secret(kube) not in (None, first), message="the new identity's token"
    )
    assert token_endpoint.count == 2
    assert token_endpoint.calls[-1].form["client_id"] == "second-app"
    assert "reusing the unexpired token" not in operator_factory.all_text


async def test_a_token_planted_in_the_secret_while_the_operator_was_down_is_not_served(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    """Whoever may edit a namespace's Secret must not choose the token that the operator's
    shared identity serves to other namespaces after a restart."""
    run = operator_factory.start()
    kube.create_token_request(NS, NAME, TARGET)
    kube.create_token_request("other", NAME, TARGET)  # same identity and scope: one token
    await wait_condition(kube, "Ready", "True")
    await wait_condition(kube, "Ready", "True", namespace="other")
    run.stop()

    planted = base64.b64encode(b"planted.by.tenant").decode()
    far = base64.b64encode(b"2099-01-01T00:00:00Z").decode()
    kube.patch_secret(NS, NAME, {"data": {"token": planted, "expires-at": far}})
    operator_factory.start()
    # Either the other namespace's genuine token is reused, or a new one is fetched: both
    # Secrets end up with a token the endpoint issued, never the planted one.
    await wait_for(
        lambda: (
            token_in_secret(kube) in token_endpoint.tokens
            and token_in_secret(kube, namespace="other") == token_in_secret(kube)
        ),
        message="both Secrets holding a token the endpoint issued",
    )
    assert token_in_secret(kube, namespace="other") != "planted.by.tenant"
    assert "planted.by.tenant" not in operator_factory.all_text


# ---- 6. an endpoint outside the allow-list gets nothing --------------------------------------


@pytest.mark.parametrize("where", ["other-host", "other-loopback-address"])
async def test_endpoint_not_allowed_receives_nothing(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory, where: str
) -> None:
    host = "127.0.0.2" if where == "other-loopback-address" else "127.0.0.1"
    with listening(host) as listener:
        if where == "other-host":
            # Anything sent to evil.example.com would go through this "proxy": it would see it.
            proxy = f"http://127.0.0.1:{listener.port}"
            env = {"HTTPS_PROXY": proxy, "https_proxy": proxy}
            endpoint = "https://evil.example.com/tenant/oauth2/v2.0/token"
            shown_host = "evil.example.com"
        else:
            env = {}
            endpoint = f"http://127.0.0.2:{listener.port}{token_endpoint.path}"
            shown_host = "127.0.0.2"
        operator_factory.start(env=env)
        kube.create_credentials_secret(
            NS,
            CREDENTIALS,
            client_id="shop-frontend-client",
            client_secret="shop-frontend-s3cr3t",
            token_endpoint=endpoint,
        )
        kube.create_token_request(
            NS, NAME, {**TARGET, "credentials": {"secretRef": {"name": CREDENTIALS}}}
        )
        status = await wait_condition(kube, "Ready", "False", "EndpointNotAllowed")
        assert shown_host in by_type(status)["Ready"]["message"]
        assert "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS" in by_type(status)["Ready"]["message"]
        # The allow-list is checked before any connection, in the look that reported it.
        assert listener.connections == 0
    assert token_endpoint.count == 0
    assert kube.read_secret(NS, NAME) is None
    # The event follows the status write: wait for it (one, and only this one, then).
    await wait_for(lambda: warnings(kube), message="the Warning")
    assert warnings(kube) == ["EndpointNotAllowed"]


# ---- 7. a namespace cannot borrow another namespace's identity -------------------------------


async def test_same_client_id_in_another_namespace_does_not_get_its_token(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    token_endpoint.register_client("shared-client-id", "team-a-s3cr3t")
    spec = {**TARGET, "credentials": {"secretRef": {"name": CREDENTIALS}}}
    kube.create_credentials_secret(
        "team-a",
        CREDENTIALS,
        client_id="shared-client-id",
        client_secret="team-a-s3cr3t",
        token_endpoint=token_endpoint.url,
    )
    kube.create_token_request("team-a", NAME, spec)
    await wait_condition(kube, "Ready", "True", namespace="team-a")
    token_a = token_in_secret(kube, namespace="team-a")
    assert token_a == token_endpoint.tokens[0]

    # Namespace B copies the client id (and the target), not the secret.
    kube.create_credentials_secret(
        "team-b",
        CREDENTIALS,
        client_id="shared-client-id",
        client_secret="a-guess",
        token_endpoint=token_endpoint.url,
    )
    kube.create_token_request("team-b", NAME, spec)
    status = await wait_condition(kube, "Ready", "False", "CredentialsRejected", namespace="team-b")
    assert not status.get("expiresAt")
    # B's own request went out, with B's secret, and was rejected.
    assert token_endpoint.count == 2
    assert token_endpoint.calls[1].form["client_secret"] == "a-guess"
    assert token_endpoint.calls[1].status == 401
    # The look that reported the rejection wrote no Secret (it would have, before the status).
    assert kube.versions(SECRETS, "team-b", NAME) == []
    everything_of_b = json.dumps(
        [kube.read_token_request("team-b", NAME), kube.events_for("team-b", NAME)]
    )
    assert token_a not in everything_of_b
    assert token_in_secret(kube, namespace="team-a") == token_a  # A is untouched


# ---- 8. secrets and tokens never show -------------------------------------------------------


async def test_no_secret_or_token_leaks_across_successes_and_failures(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    good_secret, bad_secret = "b-s3cr3t-credentials-value", "c-s3cr3t-credentials-value"
    token_endpoint.expires_in = FAST_REFRESH_LIFETIME
    seen: dict[str, itertools.count[int]] = {}
    lock = threading.Lock()
    echoed: list[str] = []

    def responder(call: TokenCall) -> Reply:
        """Failures that echo the request, as a careless proxy or endpoint might."""
        with lock:
            n = next(seen.setdefault(call.form["client_id"], itertools.count(1)))
        echo = f"client_secret={call.form['client_secret']}"
        if call.form["client_id"] == "bad-app" or (call.form["client_id"] == CLIENT_ID and n == 2):
            echoed.append(call.form["client_secret"])
            if call.form["client_id"] == "bad-app":
                return Reply.oauth_error(401, "invalid_client", f"{AADSTS7000215}: {echo}")
            return Reply.oauth_error(503, "temporarily_unavailable", f"Upstream failed: {echo}")
        return Reply.ok()

    token_endpoint.responder = responder
    run = operator_factory.start(env=FAST_REFRESH_ENV)

    # The operator's identity: a token, a failing refresh (echoing the secret), a new token.
    kube.create_token_request(NS, "own", FAST_REFRESH_SPEC)
    # A credentials Secret that works, and one that is rejected (echoing its secret).
    for name, client_id, secret in (
        ("good", "good-app", good_secret),
        ("bad", "bad-app", bad_secret),
    ):
        kube.create_credentials_secret(
            NS, f"{name}-credentials", client_id=client_id, client_secret=secret,
            token_endpoint=token_endpoint.url,
        )  # fmt: skip
        kube.create_token_request(
            NS, name, {**TARGET, "credentials": {"secretRef": {"name": f"{name}-credentials"}}}
        )
    await wait_condition(kube, "Ready", "True", name="good")
    await wait_condition(kube, "Ready", "False", "CredentialsRejected", name="bad")
    await wait_for(
        lambda: len([c for c in token_endpoint.calls if c.form["client_id"] == CLIENT_ID]) >= 3,
        message="issue, failed refresh, retried refresh",
    )
    await wait_condition(kube, "Degraded", "False", "RefreshSucceeded", name="own")
    assert sorted(set(echoed)) == sorted({CLIENT_SECRET, bad_secret})  # the traps did fire
    run.stop()

    secrets = (CLIENT_SECRET, good_secret, bad_secret, *token_endpoint.tokens)
    assert len(token_endpoint.tokens) >= 3
    operator_factory.assert_never_logged(*secrets)
    token_requests = [
        version
        for name in ("own", "good", "bad")
        for version in kube.versions(TOKEN_REQUESTS, NS, name)
    ]
    events = kube.events_text(NS)
    assert '"Warning"' in events  # the failures were reported
    for text, what in ((json.dumps(token_requests), "a TokenRequest"), (events, "an Event")):
        leaked = [value[:6] for value in secrets if value in text]
        assert not leaked, f"{what} holds a secret or token starting with {leaked}"


# ---- 9. an invalid spec is reported and fixed ------------------------------------------------


async def test_invalid_spec_is_reported_and_a_fix_takes_effect(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    """The CRD rejects most invalid specs at admission (e2e's test_crd_validation.py shows
    which); what it cannot know is the operator's own configuration: a target without a
    cluster when the operator has no default cluster (M2M_CLUSTER_NAME empty)."""
    operator_factory.start(env={"M2M_CLUSTER_NAME": ""})
    kube.create_token_request(NS, NAME, TARGET)
    status = await wait_condition(kube, "Ready", "False", "InvalidSpec")
    message = by_type(status)["Ready"]["message"]
    assert "spec.target.cluster" in message
    assert "M2M_CLUSTER_NAME" in message
    assert status["observedGeneration"] == 1
    # The spec is checked first in the look that reported it: nothing was fetched.
    assert token_endpoint.count == 0
    assert kube.read_secret(NS, NAME) is None
    await wait_for(lambda: warnings(kube) == ["InvalidSpec"], message="an InvalidSpec Warning")

    kube.patch_token_request(NS, NAME, {"spec": {"target": {"cluster": CLUSTER_NAME}}})
    status = await wait_condition(kube, "Ready", "True", "TokenIssued")
    assert status["observedGeneration"] == 2
    assert status["scope"] == SCOPE
    assert by_type(status)["Degraded"]["reason"] == "RefreshSucceeded"
    assert token_endpoint.count == 1
    assert token_in_secret(kube) == token_endpoint.tokens[0]


# ---- 10. repeated failures post one event, not one per retry ---------------------------------


async def test_repeated_failures_post_one_warning(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    # Each answer carries fresh trace and correlation ids: the messages differ every time.
    token_endpoint.always(Reply.oauth_error(503, "temporarily_unavailable"))
    kube.create_token_request(NS, NAME, TARGET)
    await wait_condition(kube, "Ready", "False", "EndpointUnavailable")
    # Retries at about 0.2, 0.6, 1.4, 3 s (M2M_RETRY_MAX_SECONDS=2): four failed calls.
    await wait_for(lambda: token_endpoint.count >= 4, timeout=15, message="four failed calls")
    await wait_for(
        lambda: (kube.read_status(NS, NAME) or {}).get("failedAttempts", 0) >= 3,
        message="three failed attempts in the status",
    )

    token_endpoint.always(Reply.ok())
    await wait_condition(kube, "Ready", "True", "TokenIssued", timeout=10)
    # The event follows the status write: wait for it. Every Warning of the failures was
    # posted before it, so the list is complete once it is there.
    await wait_for(lambda: "TokenIssued" in events(kube), message="the TokenIssued event")
    reasons = [(e["type"], e["reason"]) for e in kube.events_for(NS, NAME)]
    assert reasons == [("Warning", "EndpointUnavailable"), ("Normal", "TokenIssued")]


# ---- the API server failing the operator's own writes ----------------------------------------


async def test_refused_secret_writes_are_reported_and_retried_without_a_new_token(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    namespace = kube.ensure_namespace(NS)
    kube.proxy.add(
        Rule(Fail(503), method="POST", path=rf"/namespaces/{namespace}/secrets$", times=2)
    )
    kube.create_token_request(NS, NAME, TARGET)
    refused = await wait_condition(kube, "Degraded", "True", "SecretWriteFailed")
    message = by_type(refused)["Degraded"]["message"]
    assert message.startswith(f"create Secret {namespace}/{NAME} failed: HTTP 503")
    assert by_type(refused)["Ready"]["status"] == "False"

    ready = await wait_condition(kube, "Ready", "True", "TokenIssued")
    assert by_type(ready)["Degraded"]["reason"] == "RefreshSucceeded"
    assert ready["failedAttempts"] == 0
    assert token_in_secret(kube) == token_endpoint.tokens[0]
    assert token_endpoint.count == 1  # the token fetched before the refusals was kept
    assert max(s.get("failedAttempts", 0) for s in status_history(kube)) == 2


async def test_a_failing_status_write_is_retried_by_the_operator(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    fail_status_writes(kube, 500)
    kube.create_token_request(NS, NAME, TARGET)
    await wait_condition(kube, "Ready", "True", "TokenIssued")
    assert token_endpoint.count == 1
    assert "reason=KubernetesAPIError attempts=1 patch TokenRequest" in operator.all_text
    # The look that wrote the Secret failed on its status: the next one still says so.
    await wait_for(lambda: "TokenIssued" in events(kube), message="the TokenIssued event")
    assert [reason for reason in events(kube) if reason != "KubernetesAPIError"] == ["TokenIssued"]


async def test_a_new_secret_name_that_is_taken_keeps_the_old_secret(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    """The workload keeps its token until the new Secret really holds one."""
    kube.create_token_request(NS, NAME, TARGET)
    await wait_condition(kube, "Ready", "True")
    first = token_in_secret(kube)
    kube.create_secret(NS, "taken", {"password": "someone-elses"})

    kube.patch_token_request(NS, NAME, {"spec": {"secretName": "taken"}})
    await wait_condition(kube, "Ready", "False", "SecretConflict")
    assert token_in_secret(kube) == first  # the old Secret is still there
    assert kube.read_secret(NS, "taken") == {"password": "someone-elses"}

    kube.delete_secret(NS, "taken")
    await wait_for(lambda: token_in_secret(kube, name="taken"), message="the new Secret")
    await wait_for(lambda: kube.read_secret(NS, NAME) is None, message="the old one deleted")


async def test_a_token_request_gone_without_a_deleted_event_is_forgotten(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    """A 404 on the status write (a deletion the watch never delivered) ends the serving."""
    fail_status_writes(kube, 404)
    kube.create_token_request(NS, NAME, TARGET)
    await wait_for(
        lambda: f"tokenrequest={kube.ns(NS)}/{NAME} scope={SCOPE} forgotten" in operator.all_text,
        message="forgotten after the 404",
    )


async def test_drift_of_a_secret_two_token_requests_name_is_repaired_by_its_owner(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    kube.create_token_request(NS, NAME, TARGET)
    await wait_condition(kube, "Ready", "True")
    first = token_in_secret(kube)
    kube.create_token_request(NS, "same-secret", {**TARGET, "secretName": NAME})
    await wait_condition(kube, "Ready", "False", "SecretConflict", name="same-secret")

    edited = base64.b64encode(b"edited").decode()
    kube.patch_secret(NS, NAME, {"data": {"token": edited}})
    await wait_for(lambda: token_in_secret(kube) == first, message="the owner's repair")


async def test_secret_name_changed_while_the_operator_was_down_leaves_no_old_secret(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    run = operator_factory.start()
    kube.create_token_request(NS, NAME, TARGET)
    await wait_condition(kube, "Ready", "True")
    run.stop()

    kube.patch_token_request(NS, NAME, {"spec": {"secretName": "renamed"}})
    operator_factory.start()
    await wait_for(lambda: token_in_secret(kube, name="renamed"), message="the new Secret")
    await wait_for(lambda: kube.read_secret(NS, NAME) is None, message="the old one deleted")
