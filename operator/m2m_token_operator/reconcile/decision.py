"""What one look at a TokenRequest means: a pure function from facts to an outcome.

The reconciler gathers the facts of one look (the Secret as read, the
credentials or why they failed, the cache's answer, how the write went, the
API error that ended the look early), then `decide` turns them into the
outcome: which token the Secret now holds, the failure to report, the
attempt counters, the status, the events and when to look again. `apply`
carries the outcome out.

Which token the Secret holds is computed here and nowhere else
(`_token_in_secret`): the status, the Ready condition, the events, the
metrics and the next wake-up all follow from that one answer. Before this
split each branch of the reconciler answered it its own way, and each way
had its own defect (a valid token reported as missing after a restart, a
token reported as delivered when the write had lost a race).

No I/O, no clock, no randomness here: the caller passes `now` and the jitter,
so every row of the status table is a unit test that runs in microseconds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from m2m_token_operator.api.constants import (
    CREDENTIALS_MISSING,
    DEGRADED,
    ENDPOINT_UNAVAILABLE,
    INTERNAL_ERROR,
    INVALID_SPEC,
    KUBERNETES_API_ERROR,
    OPERATOR_IDENTITY_NOT_ALLOWED,
    OPERATOR_NAMESPACE_NOT_SERVED,
    PERMISSION_DENIED,
    SECRET_CONFLICT,
    SECRET_WRITE_FAILED,
    JsonObject,
)
from m2m_token_operator.api.spec import TokenRequestSpec
from m2m_token_operator.api.timefmt import format_time, parse_time
from m2m_token_operator.kube.kube_api import KubeError
from m2m_token_operator.reconcile.secret_output import WriteOutcome
from m2m_token_operator.reconcile.status import (
    EventSpec,
    Failure,
    Observation,
    build_status,
    condition_reason,
    status_changed,
    transition_events,
)
from m2m_token_operator.tokens.cache import CacheResult
from m2m_token_operator.tokens.credentials import CredentialsError
from m2m_token_operator.tokens.model import AccessToken, TokenEndpointError
from m2m_token_operator.tokens.timing import RetryPolicy

# The write outcomes after which the Secret holds the token the cache served.
_DELIVERED = (WriteOutcome.CREATED, WriteOutcome.UPDATED, WriteOutcome.UNCHANGED)
# While the list of namespaces granted the operator's identity has not arrived: a safety
# net only, since its arrival wakes every TokenRequest that waits for it.
OPERATOR_IDENTITY_PENDING_RETRY = timedelta(seconds=30)


@dataclass(frozen=True)
class Facts:
    """Everything one look found out, before anything was concluded from it."""

    name: str  # the TokenRequest's name (the Secret's name while the spec is invalid)
    generation: int
    previous_status: Mapping[str, Any]  # the status as last read or written
    retry: RetryPolicy
    jitter: float  # in [0, 1): spreads the retries of API failures; drawn by the caller
    spec: TokenRequestSpec | None = None
    spec_error: str | None = None
    deleting: bool = False  # metadata.deletionTimestamp is set
    # In the operator's own namespace (its identity, its seal key): refused, nothing read.
    in_operator_namespace: bool = False
    # The Secret named by spec.secretName, as read at the start of this look.
    secret_read: bool = False  # False: not read (the look ended earlier, or the read failed)
    secret_foreign: bool = False  # it exists and this TokenRequest does not own it
    secret_token: AccessToken | None = None  # the unexpired token in it, sealed or not
    # What this replica last served for the key: stands in for an unreadable Secret.
    remembered_token: AccessToken | None = None
    credentials_error: CredentialsError | None = None
    credentials_failures: int = 0  # consecutive, before this look
    # The operator's own identity: not known yet whether this namespace may use it (the
    # namespace list has not arrived), or why it may not (no token request is sent).
    operator_identity_pending: bool = False
    operator_identity_denied: str | None = None
    cache: CacheResult | None = None
    write: WriteOutcome | None = None  # None: nothing was written (no token to write)
    api_error: KubeError | None = None  # the Kubernetes API call that ended the look
    api_failures: int = 0  # consecutive, before this look
    conflicts: int = 0  # consecutive looks that found a foreign Secret, before this look
    # The m2m.dev/refresh value this look forced a fetch for (recorded in status).
    refresh_request: str | None = None
    # An unexpected exception ended the look: where its traceback is (no secret in it).
    internal_error: str | None = None
    # A permission the look needs is missing (which verb on which resource, and the fix).
    permission_denied: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What to do after a look; `apply` does exactly this and decides nothing."""

    serve: bool  # False: the TokenRequest is being deleted, forget it
    token: AccessToken | None = None  # the unexpired token now in the Secret
    observation: Observation | None = None
    status: JsonObject | None = None  # the desired status (None: leave it alone)
    write_status: bool = False  # it differs from the previous status
    events: tuple[EventSpec, ...] = ()
    failure: Failure | None = None
    count_failures: tuple[str, ...] = ()  # failure reasons to count in the metrics
    credentials_failures: int = 0
    api_failures: int = 0
    conflicts: int = 0
    wake_at: datetime | None = None
    secret_restored: bool = False  # a Secret was rewritten with the same token (drift)
    log: tuple[tuple[int, str], ...] = field(default=())  # (level, message), no secret


def failure_from(error: Exception) -> Failure:
    if isinstance(error, TokenEndpointError | CredentialsError):
        return Failure(reason=error.reason, message=str(error))
    return Failure(reason=ENDPOINT_UNAVAILABLE, message=type(error).__name__)


def failure_fields(error: Exception) -> str:
    """Structured log fields of a failure: the endpoint's correlation ids, never a secret."""
    if not isinstance(error, TokenEndpointError):
        return ""
    parts = [
        f"http_status={error.http_status}",
        f"error={error.error}",
        f"error_codes={','.join(str(c) for c in error.error_codes)}",
        f"trace_id={error.trace_id}",
        f"correlation_id={error.correlation_id}",
    ]
    return " " + " ".join(parts)


def conflict_failure(secret_name: str) -> Failure:
    return Failure(
        SECRET_CONFLICT,
        f"Secret {secret_name} exists and is not owned by this "
        "TokenRequest; it is left untouched. Delete it or choose another spec.secretName",
    )


def _api_failure(error: KubeError) -> Failure:
    # The error text is the action, the HTTP status and its reason phrase: never a body.
    if error.action.startswith(("create Secret", "replace Secret")):
        hint = "check the operator's RBAC, admission policies and quotas for Secrets here"
        return Failure(SECRET_WRITE_FAILED, f"{error}; {hint}")
    return Failure(KUBERNETES_API_ERROR, f"{error}; retrying with backoff")


def _token_in_secret(facts: Facts, now: datetime) -> tuple[AccessToken | None, bool]:
    """The one answer to "which token does the workload read now", and whether it was
    delivered (written or confirmed) by this look. Never an expired token."""
    served = facts.cache.token if facts.cache is not None else None
    token: AccessToken | None
    if served is not None and facts.write in _DELIVERED:
        token, delivered = served, True
    elif facts.secret_read:
        # Nothing (new) was written: the Secret holds what this look read from it. Also
        # right after a restart, when the cache is still empty (credentials failures).
        token, delivered = (None if facts.secret_foreign else facts.secret_token), False
    else:
        # The Secret could not be read: assume what was last served is still there
        # rather than turn Ready False on an API blip.
        token, delivered = facts.remembered_token, False
    if token is not None and token.expired(now):
        return None, False
    return token, delivered


def _retry_soon(facts: Facts, now: datetime, token: AccessToken | None) -> datetime:
    """The next look after a Kubernetes API failure: backoff, but before `token` expires."""
    backoff = facts.retry.backoff(failures=facts.api_failures + 1, jitter_fraction=facts.jitter)
    valid_until = None if token is None else token.expires_at
    return now + facts.retry.before_deadline(backoff, now=now, valid_until=valid_until)


def _operator_identity_denied(
    facts: Facts, token: AccessToken | None, secret_name: str, now: datetime
) -> tuple[Failure, datetime, bool]:
    """The failure, its time (that of the first look that found the grant missing, so a
    restart writes nothing), and whether this look is that first one."""
    message = facts.operator_identity_denied or ""
    if token is not None:
        message += (
            f". The token in Secret {secret_name} stays until it expires at"
            f" {format_time(token.expires_at)}; no new token is fetched"
        )
    _, previous_reason = condition_reason(facts.previous_status, DEGRADED)
    previous_time = facts.previous_status.get("lastFailureTime")
    failed_at, first = now, True
    if previous_reason == OPERATOR_IDENTITY_NOT_ALLOWED and previous_time:
        with contextlib.suppress(ValueError):
            failed_at, first = parse_time(str(previous_time)), False
    return Failure(OPERATOR_IDENTITY_NOT_ALLOWED, message), failed_at, first


def operator_namespace_failure() -> Failure:
    return Failure(
        OPERATOR_NAMESPACE_NOT_SERVED,
        "TokenRequests in the operator's own namespace are not served: it holds the"
        " operator's identity and seal key, which no TokenRequest may use or overwrite."
        " Create it in your application's namespace",
    )


def _first_failure_time(facts: Facts, reason: str, now: datetime) -> tuple[datetime, bool]:
    """When a failure that persists without a retry was first found (so a restart writes
    nothing), and whether this look is that first one."""
    _, previous_reason = condition_reason(facts.previous_status, DEGRADED)
    previous_time = facts.previous_status.get("lastFailureTime")
    if previous_reason == reason and previous_time:
        with contextlib.suppress(ValueError):
            return parse_time(str(previous_time)), False
    return now, True


def _held_failure(
    facts: Facts, reason: str, message: str, now: datetime
) -> tuple[Failure, datetime, bool]:
    """A failure that lasts until something outside the look changes: its time is that of
    the first look that found it (so repeated looks write nothing), and whether this is it."""
    failed_at, first = _first_failure_time(facts, reason, now)
    return Failure(reason, message), failed_at, first


def decide(facts: Facts, now: datetime) -> Outcome:
    """The outcome of one look: pure, total, and the only place that picks the token."""
    if facts.deleting:
        return Outcome(serve=False, log=((logging.INFO, "being deleted: no longer served"),))
    if facts.operator_identity_pending:
        # Never "not allowed" for a namespace merely not heard of yet: nothing is said.
        return Outcome(
            serve=True,
            credentials_failures=facts.credentials_failures,
            api_failures=facts.api_failures,
            wake_at=now + OPERATOR_IDENTITY_PENDING_RETRY,
        )
    spec = facts.spec
    secret_name = spec.secret_name if spec else facts.name
    token, delivered = (
        (None, False) if facts.in_operator_namespace else _token_in_secret(facts, now)
    )
    log: list[tuple[int, str]] = []
    count_failures: list[str] = []
    # Counters move only with what this look learnt about them.
    credentials_failures = facts.credentials_failures
    api_failures = 0
    conflicts = 0
    refresh_at: datetime | None = None
    failed_attempts = 0
    failed_at: datetime | None = None
    failure: Failure | None = None
    wake: list[datetime] = []
    cache = facts.cache

    if cache is not None and cache.fetched:
        # Whatever happened after it, this look's call to the token endpoint is told once.
        if cache.token is not None and cache.error is None:
            expires = cache.token.expires_at.isoformat()
            log.append((logging.INFO, f"token obtained, expires {expires}"))
        elif cache.error is not None:
            reason = failure_from(cache.error).reason
            count_failures.append(reason)
            log.append(
                (
                    logging.WARNING,
                    f"token request failed: reason={reason} attempts={cache.failures}"
                    f"{failure_fields(cache.error)}",
                )
            )

    if facts.in_operator_namespace:
        failure = operator_namespace_failure()
        failed_at, first = _first_failure_time(facts, failure.reason, now)
        failed_attempts = 1
        if first:
            count_failures.append(failure.reason)
            log.append((logging.WARNING, f"not served: reason={failure.reason}"))
        # Nothing to wait for: no edit of the object can change its namespace.
    elif spec is None:
        failure = Failure(INVALID_SPEC, facts.spec_error or "invalid spec")
        # Nothing to wait for: the next spec edit brings the object back.
    elif facts.internal_error is not None:
        # A bug: said in status (Degraded, and Ready False unless a still-valid token
        # is served), counted, and retried on the backoff schedule of API failures.
        failure = Failure(INTERNAL_ERROR, facts.internal_error)
        api_failures = facts.api_failures + 1
        failed_attempts, failed_at = api_failures, now
        count_failures.append(INTERNAL_ERROR)
        wake.append(_retry_soon(facts, now, token))
    elif facts.api_error is not None:
        failure = _api_failure(facts.api_error)
        api_failures = facts.api_failures + 1
        failed_attempts, failed_at = api_failures, now
        count_failures.append(failure.reason)
        log.append(
            (
                logging.WARNING,
                f"Kubernetes API call failed: reason={failure.reason} attempts={api_failures}"
                f" {facts.api_error}",
            )
        )
        # The token fetched (if any) stays cached: the next look writes it without a request.
        wake.append(_retry_soon(facts, now, token))
    elif facts.permission_denied is not None:
        # The operator's own RBAC, not this TokenRequest: counted once, no token request;
        # the permission's return wakes it (the watch's first list), the expiry below too.
        failure, failed_at, first = _held_failure(
            facts, PERMISSION_DENIED, facts.permission_denied, now
        )
        failed_attempts = 1
        if first:
            count_failures.append(failure.reason)
            log.append((logging.WARNING, f"not served: reason={failure.reason}"))
    elif facts.secret_foreign or facts.write is WriteOutcome.CONFLICT:
        # Nothing could be delivered. A foreign Secret is not watched (only owned ones
        # are): the first look learns of it from a refused create (its token stays cached,
        # written nowhere), and each later look for it to be gone is one GET, on the
        # backoff schedule (5 s doubling to 5 min), with no token request.
        failure = conflict_failure(secret_name)
        conflicts = facts.conflicts + 1
        wake.append(now + facts.retry.backoff(failures=conflicts, jitter_fraction=0.5))
    elif facts.operator_identity_denied is not None:
        failure, failed_at, first = _operator_identity_denied(facts, token, secret_name, now)
        failed_attempts = 1
        if first:
            count_failures.append(failure.reason)
            log.append(
                (
                    logging.WARNING,
                    f"not served: reason={failure.reason} (the namespace does not match the"
                    " operator identity namespace selector)",
                )
            )
        else:
            log.append((logging.DEBUG, f"still not served: reason={failure.reason}"))
        # A label change wakes it (the namespace watch); the token's expiry is added below.
    elif facts.credentials_error is not None:
        error = facts.credentials_error
        failure = failure_from(error)
        credentials_failures = facts.credentials_failures + 1
        failed_attempts, failed_at = credentials_failures, now
        count_failures.append(error.reason)
        log.append(
            (
                logging.WARNING,
                f"credentials unusable: reason={error.reason} attempts={credentials_failures}",
            )
        )
        if error.reason == CREDENTIALS_MISSING:
            # A look only reads the Secret: cheap, so it is looked for on the backoff
            # schedule (unlabelled credentials Secrets are not watched), not the hold.
            wake.append(
                now + facts.retry.backoff(failures=credentials_failures, jitter_fraction=0.5)
            )
        else:
            # The watch on an opted-in credentials Secret brings a fix sooner.
            wake.append(
                facts.retry.next_attempt_at(
                    now=now, failures=credentials_failures, error=error, jitter_fraction=0.5
                )
            )
    elif cache is not None:
        credentials_failures = 0  # the credentials were usable
        if cache.error is not None:
            failure = failure_from(cache.error)
            failed_attempts, failed_at = cache.failures, cache.last_failure_at
            # While refreshes fail, the next refresh is the next attempt, not the missed point.
            refresh_at = cache.next_attempt_at
        else:
            refresh_at = cache.refresh_at
        if cache.error is None and cache.refresh_at is not None:
            wake.append(cache.refresh_at)
        if cache.next_attempt_at is not None:
            wake.append(cache.next_attempt_at)
        if facts.write is WriteOutcome.RACED:
            # The Secret changed between the read and the replace: it still holds what was
            # read, and the new token is written on the next look, soon.
            wake.append(_retry_soon(facts, now, token))
            refresh_at = None if token is None else wake[-1]
            log.append((logging.INFO, "Secret changed while it was written; writing again soon"))
    if token is not None:
        wake.append(token.expires_at)  # Ready must turn False on time
    if spec is not None and not wake and not facts.in_operator_namespace:
        # A watch event wakes us sooner; this is the safety net, also for an answer that
        # left nothing to wait for (a token born expired).
        wake.append(now + facts.retry.maximum)

    observation = Observation(
        generation=facts.generation,
        scope=spec.scope if spec else None,
        secret_name=secret_name,
        token=token,
        refresh_at=refresh_at,
        failure=failure,
        failed_attempts=failed_attempts,
        last_failure_at=failed_at,
        now=now,
        last_refresh_request=facts.refresh_request if facts.cache is not None else None,
    )
    previous = facts.previous_status
    desired = build_status(observation, previous)
    written = delivered and facts.write in (WriteOutcome.CREATED, WriteOutcome.UPDATED)
    # Also when the Secret already held it (UNCHANGED): the look that wrote it may have
    # failed on the status write, and its event must not be lost with it.
    new_token = (
        delivered
        and desired.get("expiresAt") is not None
        and previous.get("expiresAt") != desired.get("expiresAt")
    )
    restored = written and not new_token
    events = transition_events(
        previous=previous, desired=desired, new_token_written=new_token, secret_restored=restored
    )
    if restored:
        log.append((logging.INFO, "Secret restored after drift"))
    return Outcome(
        serve=True,
        token=token,
        observation=observation,
        status=desired,
        write_status=status_changed(previous, desired),
        events=tuple(events),
        failure=failure,
        count_failures=tuple(count_failures),
        credentials_failures=credentials_failures,
        api_failures=api_failures,
        conflicts=conflicts,
        wake_at=min(wake) if wake else None,
        secret_restored=restored,
        log=tuple(log),
    )
