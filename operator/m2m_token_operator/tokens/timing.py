"""When to refresh a token and when to try again after a failure: pure functions of a clock.

Kept apart from the cache so that the arithmetic, which decides how often the
token endpoint is called, can be tested exactly with made-up times.

Refresh, as the API contract says: by default when one third of the lifetime
remains (a 3599 s token at about 40 minutes), or `refresh_before` ahead of
expiry when a TokenRequest asks for that. A `refresh_before` at least as long
as the lifetime cannot be honoured and falls back to the default rule, as
cert-manager does for a renewBefore at least as long as the duration. An
endpoint's `refresh_in` hint is not used: the contract alone decides. A jitter
drawn once per token spreads tokens issued in the same second. Two clamps keep
every lifetime from seconds to days sensible: never later than `floor` before
expiry (leaving time to retry and for the kubelet to update mounted files),
never sooner than `min_interval` after issue (so a refreshBefore just short of
the lifetime cannot make a tight loop). Both clamps shrink with short lifetimes
so that they never cross.

A token shared by several TokenRequests is refreshed at the earliest of their
refresh points, each `refresh_before` capped at half the lifetime and the
result never sooner than half the lifetime after issue (`shared_refresh_at`):
everyone gets at least the margin it asked for (up to half the lifetime), and
nobody can make the shared key cost more than two calls per token lifetime.

Retry: capped exponential backoff with jitter for transient failures, never
sooner than the endpoint's Retry-After (capped, so a hostile or broken header
cannot stop refreshes for days), and a fixed hold for permanent failures,
which only a person can fix. While the token already served is still valid, a
transient failure's wait is also capped by a fraction of the time that token
has left (never below `deadline_floor`), so the retries close in on its expiry
instead of jumping past it: the token expires only if the endpoint stays down
until then. Retry-After still wins over that cap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from m2m_token_operator.tokens.model import AccessToken, is_permanent

_ZERO = timedelta(0)


def _fraction(value: float) -> float:
    return min(1.0, max(0.0, value))


@dataclass(frozen=True)
class RefreshPolicy:
    jitter: timedelta = timedelta(seconds=30)
    floor: timedelta = timedelta(seconds=60)
    min_interval: timedelta = timedelta(seconds=60)

    def refresh_at(
        self, token: AccessToken, *, refresh_before: timedelta | None, jitter_fraction: float
    ) -> datetime:
        """When `token` is due for refresh; `jitter_fraction` in [0, 1] is drawn once per token."""
        lifetime = token.lifetime
        if lifetime <= _ZERO:
            return token.issued_at
        # Jitter only ever moves the refresh earlier: never later than anyone asked for.
        jitter = min(self.jitter, lifetime * 0.05) * _fraction(jitter_fraction)
        if refresh_before is None or refresh_before >= lifetime:
            # The default, also for a refreshBefore this token's lifetime cannot honour.
            # token.refresh_in (an endpoint hint) is deliberately ignored: the contract decides.
            point = token.issued_at + lifetime * 2 / 3 - jitter
        else:
            point = token.expires_at - refresh_before - jitter
        latest = token.expires_at - min(self.floor, lifetime / 4)
        earliest = token.issued_at + min(self.min_interval, lifetime / 2)
        return max(earliest, min(point, latest))

    def shared_refresh_at(
        self,
        token: AccessToken,
        *,
        refresh_befores: Iterable[timedelta | None],
        jitter_fraction: float,
    ) -> datetime:
        """When a token shared by subscribers asking these `refresh_befores` is due.

        The earliest subscriber's point wins, so no Secret holds the token closer to
        expiry than its TokenRequest asked; a `refresh_before` longer than half the
        lifetime counts as half, and the point is never sooner than half the lifetime
        after issue (not even by the jitter), so the key costs at most two token
        requests per lifetime whatever any subscriber asks.
        """
        half = token.lifetime / 2
        points = [
            self.refresh_at(
                token,
                refresh_before=None if before is None else min(before, half),
                jitter_fraction=jitter_fraction,
            )
            for before in set(refresh_befores)
        ]
        if not points:
            return self.refresh_at(token, refresh_before=None, jitter_fraction=jitter_fraction)
        return max(token.issued_at + max(half, _ZERO), min(points))


@dataclass(frozen=True)
class RetryPolicy:
    initial: timedelta = timedelta(seconds=5)
    maximum: timedelta = timedelta(seconds=300)
    retry_after_max: timedelta = timedelta(seconds=3600)
    permanent_hold: timedelta = timedelta(seconds=300)
    # While the token served is valid: wait at most this fraction of its remaining
    # lifetime before the next attempt, but at least `deadline_floor`.
    deadline_fraction: float = 1 / 3
    deadline_floor: timedelta = timedelta(seconds=1)

    def backoff(self, *, failures: int, jitter_fraction: float) -> timedelta:
        """The transient-failure delay: initial·2^(failures-1), capped, ±25 % jitter."""
        # In float seconds: initial·2^40 as a timedelta overflows for an initial over 79 s.
        exponent = min(max(failures, 1) - 1, 40)  # 2**40 · initial is far past any cap
        grown = self.initial.total_seconds() * float(1 << exponent)
        capped = timedelta(seconds=min(self.maximum.total_seconds(), grown))
        delay = capped * (0.75 + 0.5 * _fraction(jitter_fraction))
        # The jitter never goes below `initial` (no tight loop) nor above `maximum`.
        return max(self.initial, min(self.maximum, delay))

    def before_deadline(
        self, delay: timedelta, *, now: datetime, valid_until: datetime | None
    ) -> timedelta:
        """`delay`, shortened so that a wait ends well before `valid_until` (if any).

        A fraction of the time left, never below `deadline_floor`: the attempts close
        in on the deadline geometrically (a third of 20 minutes, then of the rest...),
        a few dozen calls at most, then one per `deadline_floor` in the last seconds.
        """
        if valid_until is None or valid_until <= now:
            return delay
        cap = max(self.deadline_floor, (valid_until - now) * _fraction(self.deadline_fraction))
        return min(delay, cap)

    def next_attempt_at(
        self,
        *,
        now: datetime,
        failures: int,
        error: Exception,
        jitter_fraction: float,
        valid_until: datetime | None = None,
    ) -> datetime:
        """When to call again after `failures` consecutive failures, the last one `error`.

        `valid_until`: the expiry of the token still served, if any; a transient
        failure is retried before it (`before_deadline`), a permanent one is held.
        """
        delay = (
            self.permanent_hold
            if is_permanent(error)
            else self.before_deadline(
                self.backoff(failures=failures, jitter_fraction=jitter_fraction),
                now=now,
                valid_until=valid_until,
            )
        )
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > 0:
            asked = min(float(retry_after), self.retry_after_max.total_seconds())
            delay = max(delay, timedelta(seconds=asked))
        return now + delay
