"""The cache keeps its own bookkeeping: what is live is never pruned, what is in flight
is never dropped.

Same fake clock and counting fetch as test_cache.py.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from m2m_token_operator.tokens.cache import FORCE_INTERVAL, CacheKey, TokenCache
from m2m_token_operator.tokens.model import EndpointUnavailable
from tests.unit.test_cache import (
    OTHER_SCOPE,
    SCOPE,
    CountingFetch,
    FakeClock,
    identity,
    make_cache,
    seeded_token,
    until,
)

KEY = CacheKey.for_credentials(identity(), SCOPE)
OTHER_KEY = CacheKey.for_credentials(identity(), OTHER_SCOPE)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def retained_after_a_failure(cache: TokenCache, fetch: CountingFetch) -> timedelta:
    """A failed key forgotten by its last subscriber: retained until its backoff ends."""
    fetch.outcomes.append(EndpointUnavailable("HTTP 503"))
    failed = await cache.get(identity(), SCOPE)
    assert failed.next_attempt_at is not None
    cache.forget(KEY)
    assert cache.peek(KEY).failures == 1  # retained
    return failed.next_attempt_at - cache.peek(KEY).last_failure_at  # type: ignore[operator]


async def test_a_seeded_token_survives_the_prune_of_its_retained_record(
    clock: FakeClock,
) -> None:
    fetch = CountingFetch(clock)
    cache = make_cache(clock, fetch)
    try:
        backoff = await retained_after_a_failure(cache, fetch)
        # A TokenRequest of that key comes back after a restart of its own look: its
        # Secret's token is seeded into the retained entry.
        cache.seed(KEY, seeded_token(3600))
        clock.advance(backoff.total_seconds())
        cache.forget(OTHER_KEY)  # any forget prunes what is retained and due
        kept = cache.peek(KEY)
        assert kept.token is not None
        assert kept.token.value == "from-secret"
        assert not (await cache.get(identity(), SCOPE)).fetched
        assert len(fetch.calls) == 1
    finally:
        cache.close()


async def test_a_forced_token_survives_the_prune_of_its_retained_record(
    clock: FakeClock,
) -> None:
    fetch = CountingFetch(clock)
    cache = make_cache(clock, fetch)
    try:
        backoff = await retained_after_a_failure(cache, fetch)
        forced = await cache.force(identity(), SCOPE)
        assert forced.fetched
        assert forced.token is not None
        assert backoff < FORCE_INTERVAL
        clock.advance(backoff.total_seconds())
        cache.forget(OTHER_KEY)  # prunes what is retained and due
        assert cache.peek(KEY).token == forced.token  # its token is kept...
        # ...and so is its forced interval: a second force within it makes no call.
        clock.now = forced.token.issued_at + FORCE_INTERVAL - timedelta(seconds=0.5)
        assert not (await cache.force(identity(), SCOPE)).fetched
        assert len(fetch.calls) == 2
    finally:
        cache.close()


async def test_a_key_forgotten_in_flight_and_wanted_again_joins_the_request(
    clock: FakeClock,
) -> None:
    gate = asyncio.Event()
    fetch = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, fetch)
    try:
        first = asyncio.create_task(cache.get(identity(), SCOPE))
        await until(lambda: len(fetch.calls) == 1, "the request started")
        # Its last subscriber leaves (say, a scope edited away) and another comes.
        cache.forget(KEY)
        second = asyncio.create_task(cache.get(identity(), SCOPE))
        await until(lambda: cache.stats.coalesced == 1 or len(fetch.calls) == 2, "the get")
        gate.set()
        results = await asyncio.gather(first, second)
        assert len(fetch.calls) == 1  # single flight, although forgotten meanwhile
        assert results[0].token == results[1].token
        assert cache.peek(KEY).token == results[0].token  # wanted: kept
    finally:
        gate.set()
        cache.close()


async def test_a_key_forgotten_in_flight_is_dropped_when_its_request_lands(
    clock: FakeClock,
) -> None:
    gate = asyncio.Event()
    fetch = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, fetch)
    try:
        request = asyncio.create_task(cache.get(identity(), SCOPE))
        await until(lambda: len(fetch.calls) == 1, "the request started")
        cache.forget(KEY)
        gate.set()
        assert (await request).token is not None  # its caller still gets the answer
        assert cache.peek(KEY).token is None  # nobody wants it: nothing left behind
    finally:
        gate.set()
        cache.close()
