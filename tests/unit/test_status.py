"""Status and events: Ready follows the Secret's token, Degraded the last attempt."""

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from m2m_token_operator.api.constants import DEGRADED, READY
from m2m_token_operator.reconcile.status import (
    Failure,
    Observation,
    build_status,
    condition_reason,
    event_body,
    status_changed,
    transition_events,
)
from m2m_token_operator.tokens.model import AccessToken

NOW = datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC)
TOKEN = AccessToken(
    value="tok-value-1234567",
    token_type="Bearer",
    issued_at=NOW,
    expires_at=NOW + timedelta(hours=1),
)
SCOPE = "api://prod.orders.orders-api/.default"


FRESH = Observation(
    generation=3,
    scope=SCOPE,
    secret_name="orders-api-token",
    token=TOKEN,
    refresh_at=NOW + timedelta(minutes=40),
    failure=None,
    failed_attempts=0,
    last_failure_at=None,
    now=NOW,
)


def observe(**changes: Any) -> Observation:
    """A fresh token's observation with some fields changed (checked by `replace`)."""
    return dataclasses.replace(FRESH, **changes)


def test_fresh_token_is_ready_and_not_degraded() -> None:
    status = build_status(observe(), {})
    assert status["observedGeneration"] == 3
    assert status["expiresAt"] == "2026-11-29T10:00:00Z"
    assert status["refreshAt"] == "2026-11-29T09:40:00Z"
    assert status["failedAttempts"] == 0
    assert status["lastFailureTime"] is None
    assert condition_reason(status, READY) == ("True", "TokenIssued")
    assert condition_reason(status, DEGRADED) == ("False", "RefreshSucceeded")
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_failed_refresh_with_valid_token_is_ready_and_degraded() -> None:
    failure = Failure("EndpointUnavailable", "HTTP 503 from the token endpoint")
    status = build_status(observe(failure=failure, failed_attempts=2, last_failure_at=NOW), {})
    assert condition_reason(status, READY) == ("True", "TokenIssued")
    assert condition_reason(status, DEGRADED) == ("True", "EndpointUnavailable")
    assert status["failedAttempts"] == 2
    assert status["lastFailureTime"] == "2026-11-29T09:00:00Z"


def test_no_token_and_failure_is_not_ready_with_the_failure_reason() -> None:
    failure = Failure("CredentialsRejected", "invalid_client")
    status = build_status(observe(token=None, failure=failure, failed_attempts=1), {})
    assert condition_reason(status, READY) == ("False", "CredentialsRejected")
    assert status["expiresAt"] is None
    assert status["refreshAt"] is None


def test_transition_time_kept_while_status_unchanged() -> None:
    first = build_status(observe(), {})
    later = build_status(observe(now=NOW + timedelta(minutes=5)), first)
    assert later["conditions"] == first["conditions"]
    assert not status_changed(first, later)
    failed = build_status(
        observe(now=NOW + timedelta(minutes=9), failure=Failure("Throttled", "429"),
                failed_attempts=1, last_failure_at=NOW + timedelta(minutes=9)),
        later,
    )  # fmt: skip
    ready = next(c for c in failed["conditions"] if c["type"] == READY)
    degraded = next(c for c in failed["conditions"] if c["type"] == DEGRADED)
    assert ready["lastTransitionTime"] == "2026-11-29T09:00:00Z"
    assert degraded["lastTransitionTime"] == "2026-11-29T09:09:00Z"
    assert status_changed(later, failed)


def test_events_once_per_state_change() -> None:
    issued = build_status(observe(), {})
    events = transition_events(previous={}, desired=issued, new_token_written=True,
                               secret_restored=False)  # fmt: skip
    assert [(e.type, e.reason) for e in events] == [("Normal", "TokenIssued")]
    failing = build_status(observe(failure=Failure("Throttled", "429")), issued)
    events = transition_events(previous=issued, desired=failing, new_token_written=False,
                               secret_restored=False)  # fmt: skip
    assert [(e.type, e.reason) for e in events] == [("Warning", "Throttled")]
    # The same failure again (a retry) posts nothing.
    assert transition_events(previous=failing, desired=failing, new_token_written=False,
                             secret_restored=False) == []  # fmt: skip
    refreshed = build_status(observe(token=TOKEN), failing)
    events = transition_events(previous=failing, desired=refreshed, new_token_written=True,
                               secret_restored=False)  # fmt: skip
    assert [(e.type, e.reason) for e in events] == [("Normal", "TokenRefreshed")]


def test_the_last_token_running_out_is_its_own_warning() -> None:
    """Refreshes already failing (reported once); then the token expires: one more word."""
    issued = build_status(observe(), {})
    failing = build_status(observe(failure=Failure("EndpointUnavailable", "503")), issued)
    expired = build_status(
        observe(token=None, failure=Failure("EndpointUnavailable", "503")), failing
    )
    assert condition_reason(expired, "Ready")[0] == "False"
    events = transition_events(previous=failing, desired=expired, new_token_written=False,
                               secret_restored=False)  # fmt: skip
    assert [(e.type, e.reason) for e in events] == [("Warning", "TokenExpired")]
    assert "orders-api-token" in events[0].message
    # A new failure that takes Ready down with it is reported once, by its own reason.
    conflict = build_status(observe(token=None, failure=Failure("SecretConflict", "taken")), issued)
    events = transition_events(previous=issued, desired=conflict, new_token_written=False,
                               secret_restored=False)  # fmt: skip
    assert [(e.type, e.reason) for e in events] == [("Warning", "SecretConflict")]


def test_event_body_names_the_token_request() -> None:
    events = transition_events(previous={}, desired=build_status(observe(), {}),
                               new_token_written=True, secret_restored=False)  # fmt: skip
    body = event_body(namespace="shop", name="orders", uid="u-1", event=events[0], now=NOW)
    assert body["involvedObject"] == {
        "apiVersion": "m2m.dev/v1alpha1",
        "kind": "TokenRequest",
        "name": "orders",
        "namespace": "shop",
        "uid": "u-1",
    }
    assert body["type"] == "Normal"
    assert TOKEN.value not in str(body)
