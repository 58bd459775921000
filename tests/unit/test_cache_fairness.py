"""Cache rules that keep one tenant from costing the others: holds that outlive the last
subscriber, and a shared key refreshed at the latest point its subscribers allow.

Same fake clock and counting fetch as test_cache.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from m2m_token_operator.cache import CacheKey, TokenCache
from m2m_token_operator.policy import RetryPolicy
from m2m_token_operator.tokens import (
    CredentialsRejected,
    EndpointUnavailable,
    ScopeRejected,
)
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
    token_cache = make_cache(clock, fetch, retry_policy=hold, max_workers=2)
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


# The latest refresh point of a shared key


async def test_a_shared_key_is_refreshed_at_the_latest_point_its_subscribers_allow(
    cache: TokenCache, fetch: CountingFetch, clock: FakeClock
) -> None:
    first = await cache.get(identity(), SCOPE)
    assert first.token is not None
    key = first.key
    default_point = first.refresh_at  # a third of the hour left: 40 minutes after issue
    assert default_point is not None
    cache.subscribe(key, ("team-a", "api"), None)
    # A tenant asks for a refresh 55 minutes before expiry (5 minutes after issue).
    cache.subscribe(key, ("team-b", "eager"), timedelta(minutes=55))
    eager = await cache.get(identity(), SCOPE, refresh_before=timedelta(minutes=55))
    assert eager.refresh_at == default_point  # not the eager one's 5 minutes

    clock.advance(10 * 60)  # past the eager point, before the shared one
    later = await cache.get(identity(), SCOPE, refresh_before=timedelta(minutes=55))
    assert not later.fetched
    assert len(fetch.calls) == 1

    # Alone on the key, the eager subscriber gets what it asked for.
    cache.unsubscribe(key, ("team-a", "api"))
    alone = await cache.get(identity(), SCOPE, refresh_before=timedelta(minutes=55))
    assert alone.fetched
    assert len(fetch.calls) == 2


async def test_the_latest_point_never_passes_the_expiry_floor(
    cache: TokenCache, clock: FakeClock
) -> None:
    first = await cache.get(identity(), SCOPE)
    assert first.token is not None
    cache.subscribe(first.key, "short", timedelta(seconds=1))
    cache.subscribe(first.key, "default", None)
    result = cache.peek(first.key)
    assert result.refresh_at is not None
    assert result.refresh_at <= first.token.expires_at - timedelta(seconds=60)


async def test_forget_drops_the_subscribers(cache: TokenCache) -> None:
    first = await cache.get(identity(), SCOPE)
    cache.subscribe(first.key, "a", None)
    cache.subscribe(first.key, "b", timedelta(minutes=55))
    cache.forget(first.key)
    second = await cache.get(identity(), SCOPE, refresh_before=timedelta(minutes=55))
    assert second.token is not None
    assert second.refresh_at == second.token.issued_at + timedelta(minutes=5)
