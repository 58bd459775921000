"""status.token, status.lastRefreshRequest and their events: NoAppRoles, RefreshRequested."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from m2m_token_operator.api.constants import NO_APP_ROLES, REFRESH_REQUESTED
from m2m_token_operator.reconcile.status import (
    Observation,
    build_status,
    no_app_roles_event,
    status_changed,
    transition_events,
)
from m2m_token_operator.tokens.claims import TokenClaims
from m2m_token_operator.tokens.model import AccessToken

NOW = datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC)
SCOPE = "api://prod-gcp.orders.orders-api/.default"


def _b64(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def jwt_token(**claims: Any) -> AccessToken:
    payload = {
        "aud": "api://prod-gcp.orders.orders-api",
        "azp": "client-1",
        "tid": "tenant-1",
        "iat": int(NOW.timestamp()),
        "exp": int((NOW + timedelta(hours=1)).timestamp()),
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    return AccessToken(
        value=f"{_b64({'alg': 'RS256'})}.{_b64(payload)}.c2ln",
        token_type="Bearer",
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )


def observe(token: AccessToken | None, **changes: Any) -> Observation:
    fields: dict[str, Any] = {
        "generation": 1,
        "scope": SCOPE,
        "secret_name": "orders-api",
        "token": token,
        "refresh_at": NOW + timedelta(minutes=40),
        "failure": None,
        "failed_attempts": 0,
        "last_failure_at": None,
        "now": NOW,
        **changes,
    }
    return Observation(**fields)


def test_status_token_is_decoded_from_the_token() -> None:
    token = jwt_token(roles=["access_as_application"])
    status = build_status(observe(token), {})
    assert status["token"] == {
        "audience": "api://prod-gcp.orders.orders-api",
        "clientId": "client-1",
        "tenantId": "tenant-1",
        "roles": ["access_as_application"],
        "issuedAt": "2026-11-29T09:00:00Z",
        "expiresAt": "2026-11-29T10:00:00Z",
    }
    assert token.value not in json.dumps(status)


def test_status_token_is_absent_for_an_opaque_token_and_without_a_token() -> None:
    opaque = AccessToken(
        value="opaque", token_type="Bearer", issued_at=NOW, expires_at=NOW + timedelta(hours=1)
    )
    assert build_status(observe(opaque), {})["token"] is None
    assert build_status(observe(None), {})["token"] is None


def test_claims_given_by_the_caller_are_used() -> None:
    claims = TokenClaims("api://given", "c", None, ("r",), None, None)
    status = build_status(observe(jwt_token(), claims=claims), {})
    assert status["token"]["audience"] == "api://given"


def test_status_changed_sees_a_new_token_identity_but_not_nulls() -> None:
    first = build_status(observe(jwt_token(roles=["a"])), {})
    stored = json.loads(json.dumps(first))  # as written: nulls are gone after a merge patch
    stored["token"] = {k: v for k, v in stored["token"].items() if v is not None}
    assert not status_changed(stored, first)
    other_roles = build_status(observe(jwt_token(roles=["a", "b"])), first)
    assert status_changed(first, other_roles)
    no_tenant = build_status(observe(jwt_token(tid=None, roles=["a"])), first)
    assert no_tenant["token"]["tenantId"] is None  # sent as null, so the patch removes it
    assert status_changed(first, no_tenant)


def test_no_app_roles_warns_once_per_identity() -> None:
    first = build_status(observe(jwt_token()), {})
    events = transition_events(
        previous={}, desired=first, new_token_written=True, secret_restored=False
    )
    warning = [e for e in events if e.reason == NO_APP_ROLES]
    assert len(warning) == 1
    assert warning[0].type == "Warning"
    assert warning[0].message == (
        "The token has no roles claim: the target application has not granted this client an"
        " app role; calls will likely get 403; ask the owners of api://prod-gcp.orders.orders-api"
        " to assign an app role to client client-1"
    )
    # A refreshed token of the same identity: said already.
    later = build_status(observe(jwt_token(iat=int(NOW.timestamp()) + 60)), first)
    assert no_app_roles_event(previous=first["token"], desired=later["token"]) is None
    # Another audience is another identity.
    moved = build_status(observe(jwt_token(aud="api://other")), first)
    assert no_app_roles_event(previous=first["token"], desired=moved["token"]) is not None
    # Roles granted, then taken away again: said again.
    granted = build_status(observe(jwt_token(roles=["r"])), first)
    assert no_app_roles_event(previous=first["token"], desired=granted["token"]) is None
    assert no_app_roles_event(previous=granted["token"], desired=first["token"]) is not None


def test_no_app_roles_silent_without_claims_or_with_roles() -> None:
    assert no_app_roles_event(previous=None, desired=None) is None
    assert no_app_roles_event(previous=None, desired={"roles": ["r"]}) is None
    unknown = no_app_roles_event(previous=None, desired={"roles": []})
    assert unknown is not None
    assert "owners of (unknown)" in unknown.message


def test_last_refresh_request_is_kept_until_a_new_one_is_handled() -> None:
    handled = build_status(observe(jwt_token(), last_refresh_request="2026-11-29T09:00:00Z"), {})
    assert handled["lastRefreshRequest"] == "2026-11-29T09:00:00Z"
    kept = build_status(observe(jwt_token()), handled)
    assert kept["lastRefreshRequest"] == "2026-11-29T09:00:00Z"
    assert not status_changed(handled, kept)
    assert build_status(observe(jwt_token()), {})["lastRefreshRequest"] is None


def test_refresh_requested_event_once_per_handled_value() -> None:
    before = build_status(observe(jwt_token(roles=["r"])), {})
    handled = build_status(observe(jwt_token(roles=["r"]), last_refresh_request="v1"), before)
    events = transition_events(
        previous=before, desired=handled, new_token_written=True, secret_restored=False
    )
    assert [e.reason for e in events] == ["TokenRefreshed", REFRESH_REQUESTED]
    assert "m2m.dev/refresh" in events[1].message
    assert "orders-api" in events[1].message
    again = build_status(observe(jwt_token(roles=["r"])), handled)
    assert (
        transition_events(
            previous=handled, desired=again, new_token_written=False, secret_restored=False
        )
        == []
    )
