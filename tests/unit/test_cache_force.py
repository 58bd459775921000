"""Forced refresh in the token cache: bypasses freshness, one call per key per 10 s.

Same fake clock and counting fetch as test_cache.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest

from m2m_token_operator.tokens.cache import FORCE_INTERVAL, CacheKey, Freshness, TokenCache
from m2m_token_operator.tokens.model import CredentialsRejected, EndpointUnavailable, Throttled
from tests.unit.test_cache import (
    SCOPE,
    START,
    CountingFetch,
    FakeClock,
    identity,
    make_cache,
    until,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fetch(clock: FakeClock) -> CountingFetch:
    return CountingFetch(clock)


@pytest.fixture
def cache(clock: FakeClock, fetch: CountingFetch) -> Iterator[TokenCache]:
    token_cache = make_cache(clock, fetch)
    yield token_cache
    token_cache.close()


async def test_force_fetches_although_the_token_is_fresh(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    first = await cache.get(identity(), SCOPE)
    clock.advance(60)
    forced = await cache.force(identity(), SCOPE)
    assert len(fetch.calls) == 2
    assert forced.fetched
    assert forced.token is not None
    assert first.token is not None
    assert forced.token.value == "token-2"
    assert forced.token.issued_at == START + timedelta(seconds=60)
    assert forced.freshness is Freshness.FRESH
    assert cache.stats.forced == 1
    # Everyone on the key now gets the new token, without another call.
    after = await cache.get(identity(), SCOPE)
    assert after.token == forced.token
    assert not after.fetched
    assert len(fetch.calls) == 2


async def test_force_on_an_unknown_key_fetches(cache: TokenCache, fetch: CountingFetch) -> None:
    forced = await cache.force(identity(), SCOPE)
    assert forced.fetched
    assert forced.token is not None
    assert len(fetch.calls) == 1


async def test_a_burst_of_forces_makes_one_call(clock: FakeClock) -> None:
    gate = asyncio.Event()
    slow = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, slow)
    try:
        gate.set()
        await cache.get(identity(), SCOPE)
        gate.clear()  # the forced request stays open until the other 49 have joined it
        forces = asyncio.gather(*(cache.force(identity(), SCOPE) for _ in range(50)))
        await until(lambda: cache.stats.coalesced == 49, "49 forces joining the first")
        gate.set()
        results = await forces
    finally:
        gate.set()
        cache.close()
    assert len(slow.calls) == 2  # the first get, then one forced call
    assert {r.token.value for r in results if r.token} == {"token-2"}
    assert sum(r.fetched for r in results) == 1


async def test_at_most_one_forced_call_per_key_every_ten_seconds(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    key = CacheKey.for_credentials(identity(), SCOPE)
    assert cache.force_allowed_at(key) is None
    await cache.force(identity(), SCOPE)
    assert cache.force_allowed_at(key) == START + FORCE_INTERVAL
    clock.advance(9)
    again = await cache.force(identity(), SCOPE)
    assert not again.fetched
    assert again.token is not None
    assert again.token.value == "token-1"
    assert len(fetch.calls) == 1
    # Another key is not limited by this one.
    other = await cache.force(identity("client-2"), SCOPE)
    assert other.fetched
    clock.advance(1)
    later = await cache.force(identity(), SCOPE)
    assert later.fetched
    assert later.token is not None
    assert later.token.value == "token-3"


async def test_force_joins_a_request_already_running(clock: FakeClock) -> None:
    gate = asyncio.Event()
    slow = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, slow)
    try:
        running = asyncio.create_task(cache.get(identity(), SCOPE))
        await until(lambda: len(slow.calls) == 1, "the get's request to start")
        forcing = asyncio.create_task(cache.force(identity(), SCOPE))
        await until(lambda: cache.stats.coalesced == 1, "the force to join the request")
        gate.set()
        forced = await forcing
        got = await running
    finally:
        gate.set()
        cache.close()
    assert len(slow.calls) == 1
    assert got.fetched
    assert not forced.fetched  # the get's caller fans out, as for any other request
    assert forced.token == got.token


async def test_force_bypasses_the_backoff(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    fetch.outcomes.append(EndpointUnavailable("HTTP 503"))
    failed = await cache.get(identity(), SCOPE)
    assert failed.error is not None
    clock.advance(1)
    assert not (await cache.get(identity(), SCOPE)).fetched  # backing off
    forced = await cache.force(identity(), SCOPE)
    assert forced.fetched
    assert forced.token is not None
    assert forced.error is None
    assert len(fetch.calls) == 2


async def test_force_obeys_the_permanent_hold_of_the_same_credential(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    """N TokenRequests with rejected secrets and a looping annotation: no request
    before the hold ends (it used to be one per key every 10 s)."""
    rejected_secrets = [f"wrong-{n}" for n in range(5)]
    for secret in rejected_secrets:
        fetch.outcomes.append(CredentialsRejected("AADSTS7000215: invalid secret"))
        assert (await cache.get(identity(secret=secret), SCOPE)).error is not None
    assert len(fetch.calls) == 5
    hold_ends = START + timedelta(minutes=5)
    while clock.now + FORCE_INTERVAL < hold_ends:
        clock.advance(FORCE_INTERVAL.total_seconds())
        for secret in rejected_secrets:
            held = await cache.force(identity(secret=secret), SCOPE)
            assert not held.fetched
            assert isinstance(held.error, CredentialsRejected)
            assert held.next_attempt_at == hold_ends
    assert len(fetch.calls) == 5
    clock.now = hold_ends
    assert (await cache.force(identity(secret="wrong-0"), SCOPE)).fetched


async def test_force_honours_retry_after(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    await cache.get(identity(), SCOPE)
    clock.advance(30)
    fetch.outcomes.append(Throttled("slow down", retry_after=120))
    throttled = await cache.force(identity(), SCOPE)
    assert throttled.error is not None
    key = CacheKey.for_credentials(identity(), SCOPE)
    assert cache.force_allowed_at(key) == START + timedelta(seconds=150)
    clock.advance(60)
    refused = await cache.force(identity(), SCOPE)
    assert not refused.fetched
    assert len(fetch.calls) == 2
    clock.advance(60)
    assert (await cache.force(identity(), SCOPE)).fetched


async def test_failed_force_keeps_serving_the_old_token(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    first = await cache.get(identity(), SCOPE)
    clock.advance(60)
    fetch.outcomes.append(EndpointUnavailable("HTTP 503"))
    failed = await cache.force(identity(), SCOPE)
    assert failed.fetched
    assert failed.token == first.token  # stale-but-valid: the Secret keeps a good token
    assert isinstance(failed.error, EndpointUnavailable)
    assert failed.failures == 1
