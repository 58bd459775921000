"""Retries after a failed refresh close in on the expiry of the token still served.

Same fake clock and counting fetch as test_cache.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from m2m_token_operator.tokens.cache import Freshness
from m2m_token_operator.tokens.model import EndpointUnavailable, Throttled
from tests.unit.test_cache import SCOPE, CountingFetch, FakeClock, identity, make_cache


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# Up to a second before expiry: the attempts close in on it, one a second at the end.
@pytest.mark.parametrize("outage_seconds", [3.0, 8.0, 8.9])
async def test_an_outage_shorter_than_the_margin_never_lets_the_token_expire(
    clock: FakeClock, outage_seconds: float
) -> None:
    """The soak's case: 30 s tokens refreshed 10 s before expiry, the endpoint down
    from the refresh point for less than those 10 s. Each attempt comes at the
    cache's `next_attempt_at`, as the scheduler wakes the TokenRequest then."""
    fetch = CountingFetch(clock, lifetime=30)
    cache = make_cache(clock, fetch)
    try:
        first = await cache.get(identity(), SCOPE)
        assert first.token is not None
        assert first.refresh_at is not None
        expires = first.token.expires_at
        assert expires - first.refresh_at == timedelta(seconds=10)
        outage_ends = first.refresh_at + timedelta(seconds=outage_seconds)
        clock.now = first.refresh_at
        while True:
            if clock.now < outage_ends:
                fetch.outcomes.append(EndpointUnavailable("HTTP 500"))
            result = await cache.get(identity(), SCOPE)
            assert result.fetched
            if result.error is None:
                break
            assert result.token == first.token  # stale but valid meanwhile
            assert result.next_attempt_at is not None
            assert result.next_attempt_at < expires  # the next try comes before expiry
            clock.now = result.next_attempt_at
        assert clock.now < expires
        assert result.freshness is Freshness.FRESH
        # Bounded: a third of the time left each time, then one a second.
        assert len(fetch.calls) <= 1 + 8
    finally:
        cache.close()


async def test_retry_after_still_wins_over_the_deadline(clock: FakeClock) -> None:
    fetch = CountingFetch(clock, lifetime=30)
    cache = make_cache(clock, fetch)
    try:
        first = await cache.get(identity(), SCOPE)
        assert first.refresh_at is not None
        clock.now = first.refresh_at
        fetch.outcomes.append(Throttled("slow down", retry_after=20))
        throttled = await cache.get(identity(), SCOPE)
        assert throttled.next_attempt_at == first.refresh_at + timedelta(seconds=20)
    finally:
        cache.close()
