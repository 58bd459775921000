"""Cache rules that keep one tenant from costing the others: holds that outlive the last
subscriber, and a shared key refreshed at the earliest point its subscribers need, each
refreshBefore capped at half the token's lifetime.

Same fake clock and counting fetch as test_cache.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from m2m_token_operator.tokens.cache import CacheKey, TokenCache
from m2m_token_operator.tokens.model import (
    CredentialsRejected,
    EndpointUnavailable,
    ScopeRejected,
)
from m2m_token_operator.tokens.timing import RetryPolicy
from tests.unit.test_cache import (
    OTHER_SCOPE,
    SCOPE,
    CountingFetch,
    FakeClock,
    identity,
    make_cache,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fetch(clock: FakeClock) -> CountingFetch:
    return CountingFetch(clock)


@pytest.fixture
def cache(clock: FakeClock, fetch: CountingFetch) -> Iterator[TokenCache]:
    hold = RetryPolicy(permanent_hold=timedelta(minutes=5))
    token_cache = make_cache(clock, fetch, retry_policy=hold, max_requests=2)
    yield token_cache
    token_cache.close()


# Holds outlive the last subscriber


async def test_toggling_the_scope_away_and_back_meets_the_same_hold(
    cache: TokenCache, fetch: CountingFetch, clock: FakeClock
) -> None:
    fetch.outcomes.append(ScopeRejected("AADSTS70011: invalid scope"))
    rejected = await cache.get(identity(), SCOPE)
    assert isinstance(rejected.error, ScopeRejected)
    key = rejected.key
    # The TokenRequest switches to another scope (its last subscriber leaves this key)...
    cache.forget(key)
    await cache.get(identity(), OTHER_SCOPE)
    # ...and back, ten times within the hold: no request for the rejected scope.
    for _ in range(10):
        cache.forget(CacheKey.for_credentials(identity(), OTHER_SCOPE))
        again = await cache.get(identity(), SCOPE)
        assert again.error is rejected.error
        assert again.next_attempt_at == rejected.next_attempt_at
        cache.forget(key)
        clock.advance(1)
    assert [scope for _, _, scope in fetch.calls].count(SCOPE) == 1


async def test_the_kept_record_ends_with_its_hold(
    cache: TokenCache, fetch: CountingFetch, clock: FakeClock
) -> None:
    fetch.outcomes.append(CredentialsRejected("AADSTS7000215: invalid secret"))
    rejected = await cache.get(identity(), SCOPE)
    cache.forget(rejected.key)
    assert cache.peek(rejected.key).error is rejected.error  # kept: the hold has not passed
    assert rejected.next_attempt_at is not None
    clock.now = rejected.next_attempt_at
    cache.forget(CacheKey.for_credentials(identity(), OTHER_SCOPE))  # any forget prunes
    assert cache.peek(rejected.key).error is None  # bounded: gone once the hold is over
    result = await cache.get(identity(), SCOPE)
    assert result.token is not None
    assert len(fetch.calls) == 2


async def test_a_success_leaves_nothing_behind(cache: TokenCache) -> None:
    result = await cache.get(identity(), SCOPE)
    cache.forget(result.key)
    assert cache.peek(result.key).token is None


async def test_a_transient_backoff_is_kept_too(
    cache: TokenCache, fetch: CountingFetch, clock: FakeClock
) -> None:
    fetch.outcomes.append(EndpointUnavailable("down"))
    failed = await cache.get(identity(), SCOPE)
    cache.forget(failed.key)
    again = await cache.get(identity(), SCOPE)
    assert again.failures == 1
    assert len(fetch.calls) == 1


# The earliest refresh point of a shared key


async def test_a_shared_key_is_refreshed_at_the_earliest_point_its_subscribers_need(
    clock: FakeClock,
) -> None:
    """The measured case: 90 s tokens, one subscriber asking 40 s, another 5 s."""
    fetch = CountingFetch(clock, lifetime=90)
    cache = make_cache(clock, fetch)
    try:
        first = await cache.get(identity(), SCOPE)
        assert first.token is not None
        key = first.key
        cache.subscribe(key, ("team-a", "api"), timedelta(seconds=40))
        cache.subscribe(key, ("team-b", "api"), timedelta(seconds=5))
        shared = cache.peek(key)
        assert shared.refresh_at == first.token.expires_at - timedelta(seconds=40)

        clock.now = first.token.expires_at - timedelta(seconds=41)
        assert not (await cache.get(identity(), SCOPE)).fetched
        clock.advance(1)  # team-a's point: due for everyone
        refreshed = await cache.get(identity(), SCOPE, refresh_before=timedelta(seconds=5))
        assert refreshed.fetched
        assert len(fetch.calls) == 2
    finally:
        cache.close()


async def test_a_large_refresh_before_on_a_shared_key_counts_as_half_the_lifetime(
    cache: TokenCache, fetch: CountingFetch, clock: FakeClock
) -> None:
    first = await cache.get(identity(), SCOPE)
    assert first.token is not None
    key = first.key
    cache.subscribe(key, ("team-a", "api"), None)
    # A tenant asks for a refresh 55 minutes before expiry (5 minutes after issue).
    cache.subscribe(key, ("team-b", "eager"), timedelta(minutes=55))
    eager = await cache.get(identity(), SCOPE, refresh_before=timedelta(minutes=55))
    assert eager.refresh_at == first.token.issued_at + timedelta(minutes=30)

    # Ten hours of refreshes, each at the key's point: two calls per token lifetime.
    end = clock.now + timedelta(hours=10)
    while clock.now < end:
        current = cache.peek(key)
        assert current.refresh_at is not None
        clock.now = current.refresh_at
        assert (await cache.get(identity(), SCOPE)).fetched
    assert len(fetch.calls) == 1 + 20

    # Alone on the key, the eager subscriber gets what it asked for.
    cache.unsubscribe(key, ("team-a", "api"))
    alone = cache.peek(key)
    assert alone.token is not None
    assert alone.refresh_at == alone.token.issued_at + timedelta(minutes=5)


async def test_a_small_refresh_before_never_delays_another_subscribers_refresh(
    cache: TokenCache, clock: FakeClock
) -> None:
    first = await cache.get(identity(), SCOPE)
    assert first.token is not None
    cache.subscribe(first.key, "short", timedelta(seconds=1))
    cache.subscribe(first.key, "default", None)
    result = cache.peek(first.key)
    # The default rule's point (a third of the hour left), not the late one.
    assert result.refresh_at == first.token.expires_at - timedelta(minutes=20)


async def test_forget_drops_the_subscribers(cache: TokenCache) -> None:
    first = await cache.get(identity(), SCOPE)
    cache.subscribe(first.key, "a", None)
    cache.subscribe(first.key, "b", timedelta(minutes=55))
    cache.forget(first.key)
    second = await cache.get(identity(), SCOPE, refresh_before=timedelta(minutes=55))
    assert second.token is not None
    assert second.refresh_at == second.token.issued_at + timedelta(minutes=5)
