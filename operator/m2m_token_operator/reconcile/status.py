"""What `kubectl get tokreq` and `kubectl describe` tell: status, conditions, events.

Readiness is about the workload: `Ready` is True exactly while the Secret holds
a token that has not expired. `Degraded` is about the operator's last attempt.
A failing refresh with a still-valid token is therefore Ready=True and
Degraded=True, the state in which nobody needs to be woken up yet.

Everything here is a pure function of an observation and the previous status,
so that an unchanged world produces an identical status and no write.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from m2m_token_operator.api.constants import (
    API_VERSION,
    DEGRADED,
    KIND,
    NO_APP_ROLES,
    PENDING,
    READY,
    REFRESH_REQUESTED,
    REFRESH_SUCCEEDED,
    SECRET_RESTORED,
    TOKEN_EXPIRED,
    TOKEN_ISSUED,
    TOKEN_REFRESHED,
    JsonObject,
)
from m2m_token_operator.api.timefmt import format_time
from m2m_token_operator.tokens.claims import TokenClaims
from m2m_token_operator.tokens.model import AccessToken

COMPONENT = "m2m-token-operator"


@dataclass(frozen=True)
class Failure:
    """Why the last attempt did not put a fresh token in the Secret. Never holds a secret."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observation:
    """Everything the status is computed from, at one moment."""

    generation: int
    scope: str | None
    secret_name: str
    token: AccessToken | None  # the unexpired token now in the Secret, if any
    refresh_at: datetime | None
    failure: Failure | None
    failed_attempts: int
    last_failure_at: datetime | None
    now: datetime
    # What the token says (status.token). Left None, it is decoded here from `token`, so
    # every caller gets it; a caller that already holds the claims may pass them.
    claims: TokenClaims | None = None
    # The m2m.dev/refresh value this look handled (refresh.recorded_value of it); None
    # keeps the one already in status, so a restart does not refresh again.
    last_refresh_request: str | None = None

    def __post_init__(self) -> None:
        if self.claims is None and self.token is not None:
            object.__setattr__(self, "claims", self.token.claims)


def _condition(
    *, kind: str, status: bool, reason: str, message: str, generation: int, previous: JsonObject
) -> JsonObject:
    text_status = "True" if status else "False"
    unchanged = previous.get("status") == text_status
    return {
        "type": kind,
        "status": text_status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        # The transition time moves only when the status flips, as kubectl users expect.
        "lastTransitionTime": previous["lastTransitionTime"]
        if unchanged and previous.get("lastTransitionTime")
        else None,
    }


def _conditions_by_type(status: Mapping[str, Any]) -> dict[str, JsonObject]:
    return {c.get("type", ""): dict(c) for c in status.get("conditions") or []}


def build_status(observation: Observation, previous: Mapping[str, Any]) -> JsonObject:
    """The complete status for this observation, reusing transition times that did not change."""
    obs = observation
    old = _conditions_by_type(previous)
    if obs.token is not None:
        ready = (
            True,
            TOKEN_ISSUED,
            f"Secret {obs.secret_name} holds a token for {obs.scope}"
            f" valid until {format_time(obs.token.expires_at)}",
        )
    elif obs.failure is not None:
        ready = (False, obs.failure.reason, obs.failure.message)
    else:
        ready = (False, PENDING, "Waiting for the first token")
    if obs.failure is not None:
        degraded = (True, obs.failure.reason, obs.failure.message)
    else:
        degraded = (False, REFRESH_SUCCEEDED, "The last token request succeeded")

    conditions = [
        _condition(kind=READY, status=ready[0], reason=ready[1], message=ready[2],
                   generation=obs.generation, previous=old.get(READY, {})),
        _condition(kind=DEGRADED, status=degraded[0], reason=degraded[1], message=degraded[2],
                   generation=obs.generation, previous=old.get(DEGRADED, {})),
    ]  # fmt: skip
    now_text = format_time(obs.now)
    for condition in conditions:
        if condition["lastTransitionTime"] is None:
            condition["lastTransitionTime"] = now_text
    return {
        "observedGeneration": obs.generation,
        "scope": obs.scope,
        "secretName": obs.secret_name,
        "expiresAt": format_time(obs.token.expires_at) if obs.token else None,
        "refreshAt": format_time(obs.refresh_at) if obs.token and obs.refresh_at else None,
        "lastFailureTime": format_time(obs.last_failure_at)
        if obs.failure and obs.last_failure_at
        else None,
        "failedAttempts": obs.failed_attempts if obs.failure else 0,
        "conditions": conditions,
        # Absent (null: a merge patch deletes it) while no token is served or it is no JWT.
        "token": obs.claims.to_status() if obs.token and obs.claims else None,
        "lastRefreshRequest": obs.last_refresh_request
        if obs.last_refresh_request is not None
        else previous.get("lastRefreshRequest"),
    }


_STATUS_FIELDS = (
    "observedGeneration",
    "scope",
    "secretName",
    "expiresAt",
    "refreshAt",
    "lastFailureTime",
    "failedAttempts",
    "conditions",
    "token",
    "lastRefreshRequest",
)


_LEAVES = (str, int, float, list)  # returned as they are (lists included, as ever)


def _without_nulls(value: Any) -> Any:
    """An object as the API server stores it after a merge patch: null members deleted."""
    if value is None or isinstance(value, _LEAVES):
        return value  # before the Mapping check: an ABC's isinstance is the slow one
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def status_changed(previous: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Compare only what we own; absent and null mean the same (a merge patch deletes nulls)."""
    for field in _STATUS_FIELDS:
        before, after = previous.get(field), desired.get(field)
        # Equal as they are is equal without nulls too; only a difference needs a second look.
        if before != after and _without_nulls(before) != _without_nulls(after):
            return True
    return False


def condition_reason(status: Mapping[str, Any], kind: str) -> tuple[str | None, str | None]:
    condition = _conditions_by_type(status).get(kind, {})
    return condition.get("status"), condition.get("reason")


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


def transition_events(
    *, previous: Mapping[str, Any], desired: Mapping[str, Any], new_token_written: bool,
    secret_restored: bool,
) -> list[EventSpec]:  # fmt: skip
    """One event per change of state, never one per retry."""
    events: list[EventSpec] = []
    if new_token_written:
        first = previous.get("expiresAt") is None
        reason = TOKEN_ISSUED if first else TOKEN_REFRESHED
        verb = "issued" if first else "refreshed"
        events.append(
            EventSpec("Normal", reason, f"Token {verb} for {desired.get('scope')}, written to "
                      f"Secret {desired.get('secretName')}, expires {desired.get('expiresAt')}")
        )  # fmt: skip
    elif secret_restored:
        events.append(
            EventSpec("Normal", SECRET_RESTORED,
                      f"Secret {desired.get('secretName')} was missing or edited and was restored")
        )  # fmt: skip
    old_status, old_reason = condition_reason(previous, DEGRADED)
    new_status, new_reason = condition_reason(desired, DEGRADED)
    new_failure = new_status == "True" and (old_status != "True" or old_reason != new_reason)
    if new_failure:
        degraded = _conditions_by_type(desired)[DEGRADED]
        events.append(EventSpec("Warning", str(new_reason), str(degraded.get("message", ""))))
    if desired.get("lastRefreshRequest") not in (None, previous.get("lastRefreshRequest")):
        events.append(refresh_requested_event(desired))
    no_roles = no_app_roles_event(previous=previous.get("token"), desired=desired.get("token"))
    if no_roles is not None:
        events.append(no_roles)
    was_ready, _ = condition_reason(previous, READY)
    now_ready, _ = condition_reason(desired, READY)
    if was_ready == "True" and now_ready == "False" and not new_failure:
        # The last token ran out while a failure already reported went on: the moment the
        # workload is left without a valid token deserves its own word.
        events.append(
            EventSpec("Warning", TOKEN_EXPIRED,
                      f"Secret {desired.get('secretName')} no longer holds an unexpired token")
        )  # fmt: skip
    return events


def refresh_requested_event(desired: Mapping[str, Any]) -> EventSpec:
    """The one event of a handled m2m.dev/refresh (the status records the value handled)."""
    return EventSpec(
        "Normal",
        REFRESH_REQUESTED,
        f"Refresh requested with annotation m2m.dev/refresh: a new token for"
        f" {desired.get('scope')} was asked for at once (at most one call per token every"
        f" 10 s); Secret {desired.get('secretName')} holds a token that expires"
        f" {desired.get('expiresAt')}",
    )


def _identity(token: Mapping[str, Any]) -> tuple[Any, Any]:
    return (token.get("clientId"), token.get("audience"))


def no_app_roles_event(
    *, previous: Mapping[str, Any] | None, desired: Mapping[str, Any] | None
) -> EventSpec | None:
    """Warning NoAppRoles when the token now served has no app role, once per token identity.

    The identity is (client id, audience) of status.token. The previous status
    remembers what was already said: a refreshed token of the same identity, or
    a restarted operator, says nothing again; a new audience or client does. It
    is a function of the status, so the operator keeps no memory of its own and
    each TokenRequest's owners (also those sharing one cached token) are told.
    """
    if not desired or desired.get("roles"):
        return None
    if previous and not previous.get("roles") and _identity(previous) == _identity(desired):
        return None
    client_id = desired.get("clientId") or "(unknown)"
    audience = desired.get("audience") or "(unknown)"
    return EventSpec(
        "Warning",
        NO_APP_ROLES,
        f"The token has no roles claim: the target application has not granted this client"
        f" an app role; calls will likely get 403; ask the owners of {audience} to assign an"
        f" app role to client {client_id}",
    )


def event_body(
    *, namespace: str, name: str, uid: str, event: EventSpec, now: datetime
) -> JsonObject:
    """A core/v1 Event about a TokenRequest (what `kubectl describe` shows)."""
    stamp = format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": name,
            "namespace": namespace,
            "uid": uid,
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": socket.gethostname()[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
