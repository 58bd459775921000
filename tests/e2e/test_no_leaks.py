"""No client secret and no token ever shows where people and tools look.

The operator handles two kinds of secrets: client secrets (its own identity's
and those of credentials Secrets) and the tokens it obtains. Neither may
appear in its log (here at debug level, the most talkative), in a
TokenRequest's status, or in an Event, whatever happens: tokens issued and
refreshed, credentials missing or pointing at a forbidden endpoint, a restart.
"""

from __future__ import annotations

import json

from devenv.operatorprocess import OperatorProcess
from devenv.tokenserver import SHORT_ISSUER, TokenServer

from ._support import (
    CLUSTER_NAME,
    OPERATOR_CLIENT_SECRET,
    Kube,
    OperatorFactory,
    condition_of,
    credentials,
    find_leaks,
    token_request,
    wait_for,
)

APP_CLIENT_SECRET = "e2e-app-secret-0a1b2c"
FORBIDDEN_CLIENT_SECRET = "e2e-forbidden-secret-9z8y"
SCOPE = f"api://{CLUSTER_NAME}.orders.orders-api/.default"


def _wait_reason(
    kube: Kube, namespace: str, name: str, reason: str, operator: OperatorProcess
) -> None:
    def reached() -> bool:
        status = (kube.get_token_request(namespace, name) or {}).get("status") or {}
        return condition_of(status, "Ready").get("reason") == reason

    wait_for(reached, timeout=30, what=f"{name} Ready reason {reason}", operator=operator)


def test_no_secret_or_token_in_log_status_or_events(
    kube: Kube, namespace: str, start_operator: OperatorFactory, token_server: TokenServer
) -> None:
    operator = start_operator()
    kube.create_secret(
        namespace,
        "app-credentials",
        credentials("e2e-app", APP_CLIENT_SECRET, token_server.token_endpoint(SHORT_ISSUER)),
    )
    kube.create_secret(
        namespace,
        "forbidden-credentials",
        # Not on the allow-list (127.0.0.1:<port>): never sent.
        credentials(
            "e2e-forbidden",
            FORBIDDEN_CLIENT_SECRET,
            f"http://localhost:{token_server.port}/default/token",
        ),
    )
    kube.create_token_request(namespace, token_request("own", scope=SCOPE))
    kube.create_token_request(
        namespace, token_request("app", scope=SCOPE, credentials_secret="app-credentials")
    )
    kube.create_token_request(
        namespace, token_request("missing", scope=SCOPE, credentials_secret="nowhere")
    )
    kube.create_token_request(
        namespace,
        token_request("forbidden", scope=SCOPE, credentials_secret="forbidden-credentials"),
    )

    tokens: set[str] = set()
    kube.wait_ready(namespace, "own", operator=operator)
    kube.wait_ready(namespace, "app", operator=operator)
    tokens.add(kube.wait_secret(namespace, "own").token)
    first_app = kube.wait_secret(namespace, "app").token
    tokens.add(first_app)
    _wait_reason(kube, namespace, "missing", "CredentialsMissing", operator)
    _wait_reason(kube, namespace, "forbidden", "EndpointNotAllowed", operator)
    # A refresh (20 s tokens at the `short` issuer), then a restart.
    tokens.add(kube.wait_secret(namespace, "app", unlike=first_app, operator=operator).token)
    restart_at = operator.log_size()  # before the restart: its lines all come after
    operator.stop()
    operator.start()
    for name in ("own", "app", "missing", "forbidden"):
        operator.wait_for_log(
            rf"tokenrequest={namespace}/{name} .*looked at: Ready=",
            timeout=30,
            since=restart_at,
        )
    kube.wait_ready(namespace, "app", operator=operator)
    for name in ("own", "app"):
        secret = kube.get_secret(namespace, name)
        assert secret is not None
        tokens.add(secret.token)

    # Every kind of event is searched, so wait for each: the operator posts an event
    # after the status that the waits above saw.
    events = kube.wait_events(
        [namespace],
        {"TokenIssued": 2, "TokenRefreshed": 1, "CredentialsMissing": 1, "EndpointNotAllowed": 1},
        operator=operator,
    )
    log = operator.log_text()
    # The check is only worth something if the secrets were really used.
    assert "requesting a token for scope" in log
    assert "(client id e2e-app)" in log
    haystacks = {"the operator's log": log}
    for body in kube.list_token_requests(namespace):
        name = body["metadata"]["name"]
        haystacks[f"status of {name}"] = json.dumps(body.get("status"))
        haystacks[f"TokenRequest {name}"] = json.dumps(body)
    for number, event in enumerate(events):
        haystacks[f"event {number} {event.reason}"] = json.dumps(event.to_dict(), default=str)

    # Whole tokens, and each JWT's signature on its own (a partial leak is a leak).
    needles = [OPERATOR_CLIENT_SECRET, APP_CLIENT_SECRET, FORBIDDEN_CLIENT_SECRET, *tokens]
    needles += [token.rsplit(".", 1)[1] for token in tokens]
    assert find_leaks(haystacks, needles) == []
