"""`decide`: one test per row of the status table in docs/api-reference.md, one per defect
of issue 10. Pure: made-up facts, a fixed `now`, no I/O, no clock, no sleeps."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from m2m_token_operator.api.constants import DEGRADED, READY
from m2m_token_operator.api.spec import TokenRequestSpec
from m2m_token_operator.api.timefmt import format_time
from m2m_token_operator.kube.kube_api import Conflict, KubeError
from m2m_token_operator.reconcile.decision import (
    RULES,
    Facts,
    Outcome,
    Partial,
    Verdict,
    decide,
    first_verdict,
    revised,
)
from m2m_token_operator.reconcile.secret_output import WriteOutcome
from m2m_token_operator.reconcile.status import build_status, condition_reason
from m2m_token_operator.tokens.cache import CacheKey, CacheResult, Freshness
from m2m_token_operator.tokens.credentials import CredentialsError
from m2m_token_operator.tokens.model import (
    AccessToken,
    CredentialsRejected,
    EndpointUnavailable,
    ScopeRejected,
    Throttled,
    TokenEndpointError,
)
from m2m_token_operator.tokens.timing import RetryPolicy

NOW = datetime(2026, 11, 29, 9, 30, tzinfo=UTC)
SCOPE = "api://prod-gcp.orders.orders-api/.default"
SPEC = TokenRequestSpec(
    scope=SCOPE, secret_name="orders-api-token", refresh_before=None, credentials_secret=None
)
KEY = CacheKey("https://login.example/token", "client-1", SCOPE, "")
RETRY = RetryPolicy()


def token(value: str, *, issued: datetime, seconds: int = 3600) -> AccessToken:
    return AccessToken(
        value=value,
        token_type="Bearer",
        issued_at=issued,
        expires_at=issued + timedelta(seconds=seconds),
    )


OLD = token("old-token", issued=NOW - timedelta(minutes=50))  # expires in 10 minutes
NEW = token("new-token", issued=NOW)


def served(
    current: AccessToken | None,
    *,
    error: Exception | None = None,
    failures: int = 0,
    fetched: bool = True,
) -> CacheResult:
    refresh_at = None if current is None else current.issued_at + current.lifetime * 2 / 3
    retry_at = NOW + timedelta(seconds=5) if error is not None else None
    return CacheResult(
        key=KEY,
        token=current,
        freshness=Freshness.NONE if current is None else Freshness.FRESH,
        error=error,
        failures=failures,
        last_failure_at=NOW if error is not None else None,
        refresh_at=refresh_at,
        next_attempt_at=retry_at if retry_at is not None else refresh_at,
        fetched=fetched,
    )


def status_with(current: AccessToken | None) -> dict[str, object]:
    """The status a look that delivered `current` (or nothing) wrote."""
    facts = facts_of(
        secret_read=True,
        cache=served(current, fetched=False) if current else None,
        write=WriteOutcome.CREATED if current else None,
    )
    outcome = decide(facts, now=current.issued_at if current else NOW)
    assert outcome.status is not None
    return outcome.status


def facts_of(**changes: object) -> Facts:
    base = Facts(
        name="orders-api",
        generation=1,
        previous_status={},
        retry=RETRY,
        jitter=0.0,
        spec=SPEC,
        secret_read=True,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_revised_facts_are_what_replace_makes_and_leave_the_original_alone() -> None:
    original = facts_of()
    error = KubeError(action="Writing Secret", status=503, reason="Service Unavailable")
    changes: dict[str, object] = {"api_error": error, "api_failures": 2, "secret_foreign": True}
    new = revised(original, **changes)
    assert new == dataclasses.replace(original, **changes)  # type: ignore[arg-type]
    assert new is not original
    assert (original.api_error, original.api_failures, original.secret_foreign) == (None, 0, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.api_failures = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field api_errors"):
        revised(original, api_errors=error)


def conditions(
    outcome: Outcome,
) -> tuple[tuple[str | None, str | None], tuple[str | None, str | None]]:
    assert outcome.status is not None
    return condition_reason(outcome.status, READY), condition_reason(outcome.status, DEGRADED)


def reasons(outcome: Outcome) -> list[tuple[str, str]]:
    return [(event.type, event.reason) for event in outcome.events]


# --- the status table, row by row ---------------------------------------------------


def test_token_issued_and_refresh_succeeded() -> None:
    outcome = decide(
        facts_of(cache=served(NEW), write=WriteOutcome.CREATED, secret_token=None), NOW
    )
    assert conditions(outcome) == (("True", "TokenIssued"), ("False", "RefreshSucceeded"))
    assert outcome.token == NEW
    assert outcome.status is not None
    assert outcome.status["expiresAt"] == format_time(NEW.expires_at)
    assert outcome.status["refreshAt"] == format_time(NOW + timedelta(seconds=2400))
    assert reasons(outcome) == [("Normal", "TokenIssued")]
    assert outcome.wake_at == NOW + timedelta(seconds=2400)  # the refresh point
    assert outcome.write_status


def test_pending_while_no_token_and_no_failure() -> None:
    # A token born expired: nothing to write, nothing failed; the safety net wakes us.
    outcome = decide(facts_of(cache=served(None)), NOW)
    assert conditions(outcome) == (("False", "Pending"), ("False", "RefreshSucceeded"))
    assert outcome.events == ()
    assert outcome.wake_at == NOW + RETRY.maximum


def test_invalid_spec() -> None:
    outcome = decide(facts_of(spec=None, spec_error="spec.target.cluster is missing"), NOW)
    assert conditions(outcome) == (("False", "InvalidSpec"), ("True", "InvalidSpec"))
    assert outcome.status is not None
    assert outcome.status["secretName"] == "orders-api"
    assert reasons(outcome) == [("Warning", "InvalidSpec")]
    assert outcome.wake_at is None  # only an edit of the spec can help


@pytest.mark.parametrize(
    "reason", ["CredentialsMissing", "CredentialsInvalid", "EndpointNotAllowed"]
)
def test_credentials_reasons_without_a_token(reason: str) -> None:
    error = CredentialsError("what to fix", reason=reason)
    outcome = decide(facts_of(credentials_error=error, credentials_failures=2), NOW)
    assert conditions(outcome) == (("False", reason), ("True", reason))
    assert outcome.credentials_failures == 3
    assert outcome.status is not None
    assert outcome.status["failedAttempts"] == 3
    assert outcome.count_failures == (reason,)
    if reason == "CredentialsMissing":
        # Looking again only reads the Secret (unlabelled ones are not watched): backoff.
        assert outcome.wake_at == NOW + RETRY.backoff(failures=3, jitter_fraction=0.5)
        assert outcome.wake_at == NOW + timedelta(seconds=20)
    else:
        assert outcome.wake_at == NOW + RETRY.permanent_hold  # or sooner, by the watch
    assert reasons(outcome) == [("Warning", reason)]


@pytest.mark.parametrize(
    "error",
    [
        CredentialsRejected("rejected"),
        ScopeRejected("no such scope"),
        EndpointUnavailable("down"),
        Throttled("slow down", retry_after=60),
    ],
    ids=lambda error: type(error).__name__,
)
def test_endpoint_failures_without_a_token(error: TokenEndpointError) -> None:
    outcome = decide(facts_of(cache=served(None, error=error, failures=1)), NOW)
    assert conditions(outcome) == (("False", error.reason), ("True", error.reason))
    assert outcome.token is None
    assert outcome.count_failures == (error.reason,)
    assert outcome.wake_at == NOW + timedelta(seconds=5)  # the cache's next attempt
    assert any("token request failed" in message for _, message in outcome.log)


def test_a_failing_refresh_keeps_ready_while_the_token_is_valid() -> None:
    previous = status_with(OLD)
    outcome = decide(
        facts_of(
            previous_status=previous,
            secret_token=OLD,
            cache=served(OLD, error=EndpointUnavailable("down"), failures=1),
            write=WriteOutcome.UNCHANGED,
        ),
        NOW,
    )
    assert conditions(outcome) == (("True", "TokenIssued"), ("True", "EndpointUnavailable"))
    assert outcome.status is not None
    assert outcome.status["refreshAt"] == format_time(NOW + timedelta(seconds=5))
    assert reasons(outcome) == [("Warning", "EndpointUnavailable")]


def test_secret_conflict() -> None:
    outcome = decide(facts_of(secret_foreign=True), NOW)
    assert conditions(outcome) == (("False", "SecretConflict"), ("True", "SecretConflict"))
    # A foreign Secret is not watched: looked for again on the backoff schedule.
    assert outcome.wake_at == NOW + timedelta(seconds=5)
    assert outcome.conflicts == 1
    assert outcome.count_failures == ()  # no attempt was made
    later = decide(facts_of(secret_foreign=True, conflicts=10), NOW)
    assert later.wake_at == NOW + RETRY.maximum  # capped at 5 minutes
    assert later.conflicts == 11
    cleared = decide(facts_of(cache=served(NEW), write=WriteOutcome.CREATED, conflicts=3), NOW)
    assert cleared.conflicts == 0


def test_secret_created_by_someone_else_during_the_look_is_a_conflict() -> None:
    outcome = decide(facts_of(cache=served(NEW), write=WriteOutcome.CONFLICT), NOW)
    assert conditions(outcome) == (("False", "SecretConflict"), ("True", "SecretConflict"))
    assert outcome.token is None


def test_secret_write_failed() -> None:
    error = KubeError(action="create Secret shop/orders-api-token", status=403, reason="Forbidden")
    outcome = decide(facts_of(cache=served(NEW), api_error=error, api_failures=1), NOW)
    # The token was fetched in this look: that is told, whatever happened after.
    assert any("token obtained" in message for _, message in outcome.log)
    assert conditions(outcome) == (("False", "SecretWriteFailed"), ("True", "SecretWriteFailed"))
    assert outcome.status is not None
    assert "HTTP 403" in str(outcome.status["conditions"][1]["message"])
    assert outcome.api_failures == 2
    assert outcome.wake_at is not None
    # The second API failure in a row: 10 s of backoff with jitter 0 (-25 %).
    assert outcome.wake_at == NOW + timedelta(seconds=7.5)


def test_kubernetes_api_error_keeps_the_token_in_the_secret() -> None:
    error = KubeError(action="read Secret shop/azure", status=500, reason="Internal Server Error")
    outcome = decide(
        facts_of(previous_status=status_with(OLD), secret_token=OLD, api_error=error), NOW
    )
    assert conditions(outcome) == (("True", "TokenIssued"), ("True", "KubernetesAPIError"))
    assert outcome.token == OLD


def test_an_unreadable_secret_assumes_what_was_last_served() -> None:
    error = KubeError(action="read Secret shop/orders-api-token", status=None, reason="Timeout")
    outcome = decide(facts_of(secret_read=False, remembered_token=OLD, api_error=error), NOW)
    assert outcome.token == OLD
    assert outcome.wake_at is not None
    assert outcome.wake_at <= OLD.expires_at


def test_kubernetes_api_retries_close_in_on_the_expiry_of_the_token_in_the_secret() -> None:
    """The fourth API failure in a row would wait 30-50 s; the Secret's token has 9 s."""
    error = KubeError(action="replace Secret shop/orders-api-token", status=None, reason="Timeout")
    ending = token("ending", issued=NOW - timedelta(seconds=21), seconds=30)
    outcome = decide(facts_of(secret_token=ending, api_error=error, api_failures=3), NOW)
    assert outcome.token == ending
    assert outcome.wake_at == NOW + timedelta(seconds=3)  # a third of what is left


def test_an_unexpected_exception_is_internal_error_and_keeps_a_still_valid_token() -> None:
    message = "see the operator's log"
    outcome = decide(
        facts_of(secret_read=False, remembered_token=OLD, internal_error=message, api_failures=2),
        NOW,
    )
    assert conditions(outcome) == (("True", "TokenIssued"), ("True", "InternalError"))
    assert outcome.token == OLD
    assert outcome.count_failures == ("InternalError",)
    assert outcome.api_failures == 3  # retried on the backoff schedule, which grows
    assert outcome.wake_at == NOW + RETRY.backoff(failures=3, jitter_fraction=0.0)
    assert outcome.status is not None
    degraded = next(c for c in outcome.status["conditions"] if c["type"] == DEGRADED)
    assert degraded["message"] == message


def test_an_unexpected_exception_without_a_token_is_not_ready() -> None:
    outcome = decide(facts_of(secret_read=False, internal_error="see the log"), NOW)
    assert conditions(outcome) == (("False", "InternalError"), ("True", "InternalError"))
    assert outcome.token is None


def test_a_missing_permission_is_permission_denied_and_keeps_the_secrets_token() -> None:
    message = "The operator may not list and watch namespaces (HTTP 403)"
    outcome = decide(facts_of(secret_token=OLD, permission_denied=message), NOW)
    assert conditions(outcome) == (("True", "TokenIssued"), ("True", "PermissionDenied"))
    assert outcome.count_failures == ("PermissionDenied",)
    assert outcome.wake_at == OLD.expires_at
    # The next look finds the same: nothing new to write, nothing counted again.
    assert outcome.status is not None
    again = decide(
        facts_of(previous_status=outcome.status, secret_token=OLD, permission_denied=message),
        NOW + timedelta(minutes=1),
    )
    assert not again.write_status
    assert again.count_failures == ()


def test_a_missing_permission_without_a_token_is_not_ready() -> None:
    outcome = decide(facts_of(permission_denied="HTTP 403"), NOW)
    assert conditions(outcome) == (("False", "PermissionDenied"), ("True", "PermissionDenied"))


# --- the events -------------------------------------------------------------------------


def test_token_refreshed_event_when_a_new_token_replaced_the_old_one() -> None:
    outcome = decide(
        facts_of(
            previous_status=status_with(OLD),
            secret_token=OLD,
            cache=served(NEW),
            write=WriteOutcome.UPDATED,
        ),
        NOW,
    )
    assert reasons(outcome) == [("Normal", "TokenRefreshed")]


def test_secret_restored_event_when_the_same_token_was_written_again() -> None:
    previous = status_with(NEW)
    outcome = decide(
        facts_of(
            previous_status=previous, cache=served(NEW, fetched=False), write=WriteOutcome.CREATED
        ),
        NOW,
    )
    assert reasons(outcome) == [("Normal", "SecretRestored")]
    assert outcome.secret_restored
    assert not outcome.write_status  # nothing in the status changed


def test_token_expired_event_when_the_last_token_runs_out_under_a_reported_failure() -> None:
    failing = facts_of(
        previous_status=status_with(OLD),
        secret_token=OLD,
        cache=served(OLD, error=EndpointUnavailable("down"), failures=1),
        write=WriteOutcome.UNCHANGED,
    )
    degraded = decide(failing, NOW)
    assert degraded.status is not None
    later = OLD.expires_at + timedelta(seconds=1)
    expired = decide(
        dataclasses.replace(
            failing,
            previous_status=degraded.status,
            secret_token=None,
            cache=served(None, error=EndpointUnavailable("down"), failures=2),
            write=None,
        ),
        later,
    )
    assert conditions(expired)[0] == ("False", "EndpointUnavailable")
    assert reasons(expired) == [("Warning", "TokenExpired")]


def test_an_unchanged_world_writes_nothing() -> None:
    facts = facts_of(cache=served(NEW, fetched=False), write=WriteOutcome.CREATED)
    first = decide(facts, NOW)
    assert first.status is not None
    again = decide(
        dataclasses.replace(facts, previous_status=first.status, write=WriteOutcome.UNCHANGED),
        NOW + timedelta(minutes=1),
    )
    assert not again.write_status
    assert again.events == ()


# --- the defects of issue 10 ----------------------------------------------------------


def test_defect_1_credentials_failure_after_a_restart_keeps_ready_with_the_secret_token() -> None:
    """After a restart the cache is empty: the token comes from the Secret as read."""
    error = CredentialsError("Secret shop/azure not found", reason="CredentialsMissing")
    outcome = decide(
        facts_of(
            previous_status=status_with(OLD),
            secret_token=OLD,
            remembered_token=None,  # nothing in the cache yet
            credentials_error=error,
        ),
        NOW,
    )
    assert conditions(outcome) == (("True", "TokenIssued"), ("True", "CredentialsMissing"))
    assert outcome.token == OLD
    assert outcome.wake_at == min(NOW + timedelta(seconds=5), OLD.expires_at)  # backoff
    assert reasons(outcome) == [("Warning", "CredentialsMissing")]


def test_defect_2_a_lost_replace_race_is_not_a_delivery() -> None:
    previous = status_with(OLD)
    outcome = decide(
        facts_of(
            previous_status=previous,
            secret_token=OLD,
            cache=served(NEW),
            write=WriteOutcome.RACED,
        ),
        NOW,
    )
    assert outcome.token == OLD
    assert outcome.status is not None
    assert outcome.status["expiresAt"] == previous["expiresAt"]
    assert all(event.reason != "TokenRefreshed" for event in outcome.events)
    assert outcome.wake_at is not None
    assert outcome.wake_at <= NOW + RETRY.initial * 1.25  # soon, not at the new refresh point


def test_defect_3_a_token_request_being_deleted_is_not_served() -> None:
    outcome = decide(facts_of(deleting=True, cache=served(NEW), secret_token=OLD), NOW)
    assert not outcome.serve
    assert outcome.status is None
    assert outcome.events == ()
    assert outcome.wake_at is None


def test_defect_6_a_secret_created_again_after_a_404_on_replace_is_delivered() -> None:
    outcome = decide(
        facts_of(
            previous_status=status_with(OLD),
            secret_token=OLD,
            cache=served(NEW),
            write=WriteOutcome.CREATED,
        ),
        NOW,
    )
    assert conditions(outcome) == (("True", "TokenIssued"), ("False", "RefreshSucceeded"))
    assert reasons(outcome) == [("Normal", "TokenRefreshed")]


def test_an_expired_token_is_never_reported() -> None:
    expired = token("gone", issued=NOW - timedelta(hours=2))
    outcome = decide(
        facts_of(
            secret_token=expired,
            credentials_error=CredentialsError("x", reason="CredentialsMissing"),
        ),
        NOW,
    )
    assert outcome.token is None


def test_status_agrees_with_build_status() -> None:
    """The status in the outcome is exactly status.build_status of its observation."""
    outcome = decide(facts_of(cache=served(NEW), write=WriteOutcome.CREATED), NOW)
    assert outcome.observation is not None
    assert outcome.status == build_status(outcome.observation, {})


def test_a_conflict_error_type_is_a_kube_error() -> None:
    # Conflict from the status write is re-decided as an API failure like any other.
    error = Conflict(
        action="patch TokenRequest shop/orders-api status", status=409, reason="Conflict"
    )
    outcome = decide(facts_of(cache=served(NEW), write=WriteOutcome.CREATED, api_error=error), NOW)
    assert conditions(outcome)[1] == ("True", "KubernetesAPIError")
    assert reasons(outcome) == [("Normal", "TokenIssued"), ("Warning", "KubernetesAPIError")]


def test_operator_namespace_not_served() -> None:
    # Issue 18: a TokenRequest in the operator's own namespace (where a secretRef would
    # name the operator's identity and a secretName its seal key). The reconciler reads
    # nothing for it; whatever else the facts say, nothing is served and no wake is set.
    facts = facts_of(in_operator_namespace=True, secret_read=False, remembered_token=OLD)
    outcome = decide(facts, NOW)
    assert conditions(outcome) == (
        ("False", "OperatorNamespaceNotServed"),
        ("True", "OperatorNamespaceNotServed"),
    )
    assert outcome.token is None
    assert outcome.wake_at is None
    assert outcome.count_failures == ("OperatorNamespaceNotServed",)
    assert reasons(outcome) == [("Warning", "OperatorNamespaceNotServed")]
    assert outcome.status is not None
    assert "operator's own namespace" in outcome.status["conditions"][1]["message"]
    # Looked at again (a restart, a resync): the same status, nothing written or counted.
    again = decide(dataclasses.replace(facts, previous_status=outcome.status), NOW + timedelta(1))
    assert not again.write_status
    assert again.events == ()
    assert again.count_failures == ()


# --- the rules: an ordered list, the first that answers wins -------------------------

PRECEDENCE = (
    "operator_namespace",
    "invalid_spec",
    "internal_error",
    "api_error",
    "permission_denied",
    "secret_conflict",
    "operator_identity_denied",
    "credentials_unusable",
    "cache_answer",
)


def test_the_rules_run_in_the_documented_precedence() -> None:
    assert tuple(rule.__name__ for rule in RULES) == PRECEDENCE
    # The same order as docs/architecture.md states it ("Precedence, highest first").
    doc = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    listed = doc.split("Precedence,\n  highest first:", 1)[1].split(".\n", 1)[0]
    assert tuple(re.findall(r"`(\w+)`", listed)) == PRECEDENCE


def test_each_rule_wins_over_every_rule_after_it() -> None:
    # One fact per rule, all at once; dropping them from the top, the reason reported is
    # always that of the first rule whose fact remains.
    triggers: list[tuple[dict[str, object], str]] = [
        ({"in_operator_namespace": True}, "OperatorNamespaceNotServed"),
        ({"spec": None, "spec_error": "bad"}, "InvalidSpec"),
        ({"internal_error": "boom"}, "InternalError"),
        (
            {
                "api_error": KubeError(
                    action="get Secret", status=500, reason="Internal Server Error"
                )
            },
            "KubernetesAPIError",
        ),
        ({"permission_denied": "list secrets"}, "PermissionDenied"),
        ({"secret_foreign": True}, "SecretConflict"),
        ({"operator_identity_denied": "not allowed"}, "OperatorIdentityNotAllowed"),
        (
            {"credentials_error": CredentialsError("gone", reason="CredentialsMissing")},
            "CredentialsMissing",
        ),
    ]
    for first in range(len(triggers)):
        changes: dict[str, object] = {}
        for fact, _ in triggers[first:]:
            changes.update(fact)
        outcome = decide(facts_of(**changes), NOW)
        assert outcome.failure is not None
        assert outcome.failure.reason == triggers[first][1], triggers[first]


def test_no_rule_answers_without_a_cache_answer() -> None:
    partial = Partial(secret_name="orders-api-token", token=None)
    assert first_verdict(facts_of(), NOW, partial) == Verdict()
    outcome = decide(facts_of(credentials_failures=2, api_failures=3), NOW)
    assert outcome.failure is None
    assert (outcome.credentials_failures, outcome.api_failures) == (2, 0)
