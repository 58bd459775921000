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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
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


_FACT_NAMES = frozenset(f.name for f in fields(Facts))


def revised(facts: Facts, **changes: Any) -> Facts:
    """`dataclasses.replace(facts, **changes)`, at a tenth of its cost.

    A look revises its facts four times or more; replace runs the frozen `__init__`
    (an `object.__setattr__` per field, 25 of them) each time: 5 % of a look's CPU.
    Unknown names are refused as by replace.
    """
    unknown = changes.keys() - _FACT_NAMES
    if unknown:
        raise TypeError(f"Facts has no field {', '.join(sorted(unknown))}")
    new = object.__new__(Facts)
    # Frozen: its __setattr__ refuses; the instance dictionary does not ask it.
    new.__dict__.update(facts.__dict__)
    new.__dict__.update(changes)
    return new


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


@dataclass(frozen=True)
class Partial:
    """What every rule may read besides the facts, worked out once before the rules run."""

    secret_name: str
    token: AccessToken | None  # the unexpired token in the Secret now (`_token_in_secret`)


@dataclass(frozen=True)
class Verdict:
    """A rule's answer: the failure to report (None: none) and what follows from it.

    Counters move only with what the look learnt about them: `credentials_failures`
    None keeps the count as it was before the look; the others start again at 0."""

    failure: Failure | None = None
    failed_attempts: int = 0
    failed_at: datetime | None = None
    count_failures: tuple[str, ...] = ()  # failure reasons to count in the metrics
    log: tuple[tuple[int, str], ...] = ()
    credentials_failures: int | None = None
    api_failures: int = 0
    conflicts: int = 0
    wake: tuple[datetime, ...] = ()
    refresh_at: datetime | None = None


Rule = Callable[[Facts, datetime, Partial], Verdict | None]


def operator_namespace(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """In the operator's own namespace: refused, and nothing to wait for (no edit of the
    object can change its namespace)."""
    if not facts.in_operator_namespace:
        return None
    failure = operator_namespace_failure()
    failed_at, first = _first_failure_time(facts, failure.reason, now)
    return Verdict(
        failure=failure,
        failed_attempts=1,
        failed_at=failed_at,
        count_failures=(failure.reason,) if first else (),
        log=((logging.WARNING, f"not served: reason={failure.reason}"),) if first else (),
    )


def invalid_spec(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """Nothing to wait for: the next spec edit brings the object back."""
    if facts.spec is not None:
        return None
    return Verdict(failure=Failure(INVALID_SPEC, facts.spec_error or "invalid spec"))


def internal_error(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """A bug: said in status (Degraded, and Ready False unless a still-valid token is
    served), counted, and retried on the backoff schedule of API failures."""
    if facts.internal_error is None:
        return None
    api_failures = facts.api_failures + 1
    return Verdict(
        failure=Failure(INTERNAL_ERROR, facts.internal_error),
        api_failures=api_failures,
        failed_attempts=api_failures,
        failed_at=now,
        count_failures=(INTERNAL_ERROR,),
        wake=(_retry_soon(facts, now, partial.token),),
    )


def api_error(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """A Kubernetes API call ended the look: retried with backoff. The token fetched (if
    any) stays cached: the next look writes it without a request."""
    if facts.api_error is None:
        return None
    failure = _api_failure(facts.api_error)
    api_failures = facts.api_failures + 1
    message = (
        f"Kubernetes API call failed: reason={failure.reason} attempts={api_failures}"
        f" {facts.api_error}"
    )
    return Verdict(
        failure=failure,
        api_failures=api_failures,
        failed_attempts=api_failures,
        failed_at=now,
        count_failures=(failure.reason,),
        log=((logging.WARNING, message),),
        wake=(_retry_soon(facts, now, partial.token),),
    )


def permission_denied(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """The operator's own RBAC, not this TokenRequest: counted once, no token request; the
    permission's return wakes it (the watch's first list), the token's expiry too."""
    if facts.permission_denied is None:
        return None
    failure, failed_at, first = _held_failure(
        facts, PERMISSION_DENIED, facts.permission_denied, now
    )
    return Verdict(
        failure=failure,
        failed_attempts=1,
        failed_at=failed_at,
        count_failures=(failure.reason,) if first else (),
        log=((logging.WARNING, f"not served: reason={failure.reason}"),) if first else (),
    )


def secret_conflict(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """Nothing could be delivered. A foreign Secret is not watched (only owned ones are):
    the first look learns of it from a refused create (its token stays cached, written
    nowhere), and each later look for it to be gone is one GET, on the backoff schedule
    (5 s doubling to 5 min), with no token request."""
    if not (facts.secret_foreign or facts.write is WriteOutcome.CONFLICT):
        return None
    conflicts = facts.conflicts + 1
    return Verdict(
        failure=conflict_failure(partial.secret_name),
        conflicts=conflicts,
        wake=(now + facts.retry.backoff(failures=conflicts, jitter_fraction=0.5),),
    )


def operator_identity_denied(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """The namespace may not use the operator's identity. A label change wakes it (the
    namespace watch); the token's expiry too."""
    if facts.operator_identity_denied is None:
        return None
    failure, failed_at, first = _operator_identity_denied(
        facts, partial.token, partial.secret_name, now
    )
    log = (
        (
            logging.WARNING,
            f"not served: reason={failure.reason} (the namespace does not match the"
            " operator identity namespace selector)",
        )
        if first
        else (logging.DEBUG, f"still not served: reason={failure.reason}")
    )
    return Verdict(
        failure=failure,
        failed_attempts=1,
        failed_at=failed_at,
        count_failures=(failure.reason,) if first else (),
        log=(log,),
    )


def credentials_unusable(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """The client credentials could not be read or used: no token request, retried."""
    error = facts.credentials_error
    if error is None:
        return None
    credentials_failures = facts.credentials_failures + 1
    if error.reason == CREDENTIALS_MISSING:
        # A look only reads the Secret: cheap, so it is looked for on the backoff
        # schedule (unlabelled credentials Secrets are not watched), not the hold.
        wake = now + facts.retry.backoff(failures=credentials_failures, jitter_fraction=0.5)
    else:
        # The watch on an opted-in credentials Secret brings a fix sooner.
        wake = facts.retry.next_attempt_at(
            now=now, failures=credentials_failures, error=error, jitter_fraction=0.5
        )
    return Verdict(
        failure=failure_from(error),
        credentials_failures=credentials_failures,
        failed_attempts=credentials_failures,
        failed_at=now,
        count_failures=(error.reason,),
        log=(
            (
                logging.WARNING,
                f"credentials unusable: reason={error.reason} attempts={credentials_failures}",
            ),
        ),
        wake=(wake,),
    )


def cache_answer(facts: Facts, now: datetime, partial: Partial) -> Verdict | None:
    """The credentials were usable and the cache answered: its token (delivered or not)
    or its failure, and when to refresh."""
    cache = facts.cache
    if cache is None:
        return None
    failure: Failure | None = None
    failed_attempts = 0
    failed_at: datetime | None = None
    wake: list[datetime] = []
    log: tuple[tuple[int, str], ...] = ()
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
        wake.append(_retry_soon(facts, now, partial.token))
        refresh_at = None if partial.token is None else wake[-1]
        log = ((logging.INFO, "Secret changed while it was written; writing again soon"),)
    return Verdict(
        failure=failure,
        failed_attempts=failed_attempts,
        failed_at=failed_at,
        credentials_failures=0,  # the credentials were usable
        log=log,
        wake=tuple(wake),
        refresh_at=refresh_at,
    )


# The precedence of what a look reports, highest first: the first rule that answers wins
# (docs/architecture.md, "decide"). When none answers (no cache answer: nothing fetched),
# nothing is reported and the counters stay as they were.
RULES: tuple[Rule, ...] = (
    operator_namespace,
    invalid_spec,
    internal_error,
    api_error,
    permission_denied,
    secret_conflict,
    operator_identity_denied,
    credentials_unusable,
    cache_answer,
)


def first_verdict(facts: Facts, now: datetime, partial: Partial) -> Verdict:
    """The answer of the first rule in `RULES` that answers, or the empty verdict."""
    for rule in RULES:
        verdict = rule(facts, now, partial)
        if verdict is not None:
            return verdict
    return Verdict()


def _fetch_log(cache: CacheResult | None) -> tuple[list[str], list[tuple[int, str]]]:
    """The failures to count and the log lines of this look's call to the token endpoint:
    whatever happened after it, the call is told once."""
    if cache is None or not cache.fetched:
        return [], []
    if cache.token is not None and cache.error is None:
        expires = cache.token.expires_at.isoformat()
        return [], [(logging.INFO, f"token obtained, expires {expires}")]
    if cache.error is not None:
        reason = failure_from(cache.error).reason
        message = (
            f"token request failed: reason={reason} attempts={cache.failures}"
            f"{failure_fields(cache.error)}"
        )
        return [reason], [(logging.WARNING, message)]
    return [], []


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
    count_failures, log = _fetch_log(facts.cache)
    verdict = first_verdict(facts, now, Partial(secret_name=secret_name, token=token))
    count_failures.extend(verdict.count_failures)
    log.extend(verdict.log)
    credentials_failures = (
        facts.credentials_failures
        if verdict.credentials_failures is None
        else verdict.credentials_failures
    )
    api_failures = verdict.api_failures
    conflicts = verdict.conflicts
    refresh_at = verdict.refresh_at
    failed_attempts = verdict.failed_attempts
    failed_at = verdict.failed_at
    failure = verdict.failure
    wake = list(verdict.wake)

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
