"""What a token is, and why the token endpoint did not issue one.

Kept apart from the HTTP client (`client.py`) so that the modules that only
reason about tokens (`policy`, `cache`, `status`, `secret_output`, `metrics`,
the decision) need not import `requests`, and so that `settings`,
`credentials`, `policy` and `client` no longer import one another in a circle.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from m2m_token_operator.api.constants import (
    CREDENTIALS_REJECTED,
    ENDPOINT_UNAVAILABLE,
    SCOPE_REJECTED,
    THROTTLED,
)
from m2m_token_operator.tokens.claims import TokenClaims, decode_claims
from m2m_token_operator.tokens.credentials import CredentialsError


def utc_now() -> datetime:
    """The one wall clock of the operator (tests pass their own clocks instead)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class AccessToken:
    """A token as issued. Its value never shows in repr, logs or messages."""

    value: str = field(repr=False)
    token_type: str
    issued_at: datetime  # UTC, when the request was sent: a conservative start of validity
    expires_at: datetime

    @property
    def lifetime(self) -> timedelta:
        return self.expires_at - self.issued_at

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    @functools.cached_property
    def claims(self) -> TokenClaims | None:
        """What the token says (unverified), decoded once: every look at each of the
        TokenRequests sharing it shows it in status."""
        return decode_claims(self.value)


class TokenEndpointError(Exception):
    """The token endpoint did not issue a token. `str()` never holds a secret or a token."""

    reason: ClassVar[str] = ENDPOINT_UNAVAILABLE
    permanent: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error: str | None = None,
        error_description: str | None = None,
        error_codes: tuple[int, ...] = (),
        trace_id: str | None = None,
        correlation_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error = error
        self.error_description = error_description
        self.error_codes = error_codes
        self.trace_id = trace_id
        self.correlation_id = correlation_id
        self.retry_after = retry_after  # seconds, as the endpoint asked


class CredentialsRejected(TokenEndpointError):
    reason = CREDENTIALS_REJECTED
    permanent = True


class ScopeRejected(TokenEndpointError):
    reason = SCOPE_REJECTED
    permanent = True


class Throttled(TokenEndpointError):
    reason = THROTTLED
    permanent = False


class EndpointUnavailable(TokenEndpointError):
    reason = ENDPOINT_UNAVAILABLE
    permanent = False


def is_permanent(error: Exception) -> bool:
    """Whether retrying without a change by a person is pointless."""
    if isinstance(error, CredentialsError):
        return True
    return isinstance(error, TokenEndpointError) and error.permanent
