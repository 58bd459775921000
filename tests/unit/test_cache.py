"""The token cache: single flight, keys, stale-but-valid, backoff, holds, seeding.

Time is a fake clock advanced by hand; the fetch is a counting in-process
callable, except where the HTTP request itself is the point. A request that
must stay open while other callers arrive is held by a gate the test opens once
it has seen them arrive (the cache's own counters), never by a sleep.
"""

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from m2m_token_operator.tokens.cache import (
    CacheKey,
    CacheResult,
    Freshness,
    TokenCache,
    token_jitter,
)
from m2m_token_operator.tokens.client import TokenClient
from m2m_token_operator.tokens.credentials import (
    ClientCredentials,
    secret_credentials,
)
from m2m_token_operator.tokens.model import (
    AccessToken,
    CredentialsRejected,
    EndpointUnavailable,
    ScopeRejected,
    Throttled,
)
from m2m_token_operator.tokens.timing import RefreshPolicy, RetryPolicy

SCOPE = "api://prod-gcp.orders.orders-api/.default"
OTHER_SCOPE = "api://prod-gcp.orders.billing-api/.default"
START = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy configured in the environment must not intercept the loopback server."""
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class CountingFetch:
    """Issues `lifetime`-second tokens, or raises the queued outcomes first.

    With a `gate`, each request waits until the test opens it. `in_flight_peak` is
    the most requests that were ever open at once.
    """

    def __init__(
        self, clock: FakeClock, *, lifetime: float = 3600, gate: asyncio.Event | None = None
    ) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.gate = gate
        self.calls: list[tuple[str, str, str]] = []  # (client id, secret, scope)
        self.outcomes: list[BaseException] = []
        self.in_flight = 0
        self.in_flight_peak = 0

    async def __call__(self, credentials: ClientCredentials, scope: str) -> AccessToken:
        proof = credentials.client_secret or credentials.method
        self.calls.append((credentials.client_id, proof, scope))
        number = len(self.calls)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        issued = self.clock()
        self.in_flight += 1
        self.in_flight_peak = max(self.in_flight_peak, self.in_flight)
        try:
            if self.gate is not None:
                async with asyncio.timeout(30):
                    await self.gate.wait()
        finally:
            self.in_flight -= 1
        if outcome is not None:
            raise outcome
        return AccessToken(
            value=f"token-{number}",
            token_type="Bearer",
            issued_at=issued,
            expires_at=issued + timedelta(seconds=self.lifetime),
        )


def identity(
    client_id: str = "client-1", *, secret: str = "secret-1", realm: str = ""
) -> ClientCredentials:
    return secret_credentials(
        token_endpoint="https://login.microsoftonline.com/t/oauth2/v2.0/token",
        client_id=client_id,
        client_secret=secret,
        source="operator identity" if not realm else f"Secret {realm}/azure",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fetch(clock: FakeClock) -> CountingFetch:
    return CountingFetch(clock)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the event loop (and the HTTP server's threads) run until `condition` holds.

    The conditions are the cache's counters and the fetch's progress, which signal
    no asyncio.Event: polling them is the way to wait for them.
    """
    try:
        async with asyncio.timeout(10):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


def make_cache(
    clock: FakeClock,
    fetch: CountingFetch,
    *,
    retry_policy: RetryPolicy | None = None,
    max_requests: int = 4,
) -> TokenCache:
    # random() = 0: no jitter, and the lowest backoff (5, 7.5, 15, ... seconds).
    return TokenCache(
        fetch=fetch,
        refresh_policy=RefreshPolicy(),
        retry_policy=retry_policy or RetryPolicy(),
        clock=clock,
        random=lambda: 0.0,
        jitter_of=lambda token: 0.0,
        max_requests=max_requests,
    )


@pytest.fixture
def cache(clock: FakeClock, fetch: CountingFetch) -> Iterator[TokenCache]:
    token_cache = make_cache(clock, fetch)
    yield token_cache
    token_cache.close()


# Single flight and keys


async def test_200_concurrent_gets_make_one_request(clock: FakeClock) -> None:
    gate = asyncio.Event()
    slow = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, slow)
    gets = asyncio.gather(*(cache.get(identity(), SCOPE) for _ in range(200)))
    # The request stays open until all the other callers have joined it.
    await until(lambda: cache.stats.coalesced == 199, "199 callers waiting for the request")
    gate.set()
    results = await gets
    assert len(slow.calls) == 1
    assert {result.token.value for result in results if result.token} == {"token-1"}
    assert all(result.freshness is Freshness.FRESH for result in results)
    assert sum(result.fetched for result in results) == 1  # one caller started the request
    assert cache.stats.requests == 1
    assert cache.stats.coalesced == 199
    cache.close()


async def test_200_concurrent_gets_make_one_http_request(httpserver: HTTPServer) -> None:
    gate = threading.Event()

    def token_endpoint(request: Request) -> Response:
        assert gate.wait(timeout=30), "the test never opened the gate"
        return Response(
            json.dumps({"access_token": "real-token", "expires_in": 3599}),
            content_type="application/json",
        )

    httpserver.expect_request("/token", method="POST").respond_with_handler(token_endpoint)
    client = TokenClient(connect_timeout=2, read_timeout=2)
    cache = TokenCache(
        fetch=client.fetch,
        refresh_policy=RefreshPolicy(),
        retry_policy=RetryPolicy(),
        clock=lambda: datetime.now(UTC),
    )
    credentials = secret_credentials(
        token_endpoint=httpserver.url_for("/token"),
        client_id="client-1",
        client_secret="s",
        source="operator identity",
    )
    try:
        gets = asyncio.gather(*(cache.get(credentials, SCOPE) for _ in range(200)))
        # The server answers once all the other callers wait for its answer.
        await until(lambda: cache.stats.coalesced == 199, "199 callers waiting for the request")
        gate.set()
        results = await gets
        again = await cache.get(credentials, SCOPE)
    finally:
        gate.set()
        cache.close()
        await client.aclose()
    assert len(httpserver.log) == 1
    assert {result.token.value for result in results if result.token} == {"real-token"}
    assert again.freshness is Freshness.FRESH
    assert not again.fetched


async def test_hit_makes_no_request(cache: TokenCache, fetch: CountingFetch) -> None:
    first = await cache.get(identity(), SCOPE)
    second = await cache.get(identity(), SCOPE)
    assert len(fetch.calls) == 1
    assert first.fetched
    assert not second.fetched
    assert second.token == first.token
    assert second.freshness is Freshness.FRESH
    assert second.refresh_at == START + timedelta(minutes=40)
    assert second.next_attempt_at == second.refresh_at
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


async def test_requests_in_flight_are_bounded(clock: FakeClock) -> None:
    """Ten new scopes at once, four slots: four requests go out, the rest wait for a slot."""
    gate = asyncio.Event()
    slow = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, slow, max_requests=4)
    scopes = [f"api://prod-gcp.orders.app-{index}/.default" for index in range(10)]
    gets = asyncio.gather(*(cache.get(identity(), scope) for scope in scopes))
    await until(lambda: len(slow.calls) == 4, "four requests to go out")
    gate.set()
    results = await gets
    assert all(result.token is not None for result in results)
    assert len(slow.calls) == 10
    assert slow.in_flight_peak == 4
    cache.close()


async def test_different_client_ids_and_scopes_get_their_own_tokens(
    cache: TokenCache, fetch: CountingFetch
) -> None:
    a = await cache.get(identity("client-a"), SCOPE)
    b = await cache.get(identity("client-b"), SCOPE)
    c = await cache.get(identity("client-a"), OTHER_SCOPE)
    assert len(fetch.calls) == 3
    assert len({a.token, b.token, c.token}) == 3
    assert a.key != b.key != c.key


async def test_same_client_id_with_another_secret_is_never_served_the_token(
    cache: TokenCache, fetch: CountingFetch
) -> None:
    owner = await cache.get(identity("client-1", realm="shop"), SCOPE)
    copier = await cache.get(identity("client-1", secret="guess", realm="shop"), SCOPE)
    assert len(fetch.calls) == 2
    assert owner.token is not None
    assert copier.token is not None
    assert owner.token.value != copier.token.value
    assert fetch.calls[1] == ("client-1", "guess", SCOPE)


async def test_the_same_secret_shares_one_token_across_namespaces(
    cache: TokenCache, fetch: CountingFetch
) -> None:
    # Both hold the secret, so each could fetch the token itself: sharing gives nothing away.
    shop = await cache.get(identity("client-1", realm="shop"), SCOPE)
    other = await cache.get(identity("client-1", realm="other"), SCOPE)
    assert len(fetch.calls) == 1
    assert shop.token == other.token


async def test_key_is_the_contract_key_with_the_credential_fingerprint() -> None:
    credentials = identity("client-1", realm="shop")
    assert CacheKey.for_credentials(credentials, SCOPE) == CacheKey(
        token_endpoint=credentials.token_endpoint,
        client_id="client-1",
        scope=SCOPE,
        fingerprint=credentials.fingerprint(),
    )
    assert credentials.fingerprint() == identity("client-1").fingerprint()
    assert credentials.fingerprint() != identity("client-1", secret="other").fingerprint()
    assert "secret-1" not in credentials.fingerprint()


# Refresh points


async def test_refresh_at_the_refresh_point(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    await cache.get(identity(), SCOPE)
    clock.advance(40 * 60 - 1)
    before = await cache.get(identity(), SCOPE)
    assert before.token is not None
    assert before.token.value == "token-1"
    clock.advance(1)
    refreshed = await cache.get(identity(), SCOPE)
    assert len(fetch.calls) == 2
    assert refreshed.token is not None
    assert refreshed.token.value == "token-2"
    assert refreshed.freshness is Freshness.FRESH
    assert refreshed.fetched


async def test_each_caller_has_its_own_refresh_before(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    await cache.get(identity(), SCOPE)
    clock.advance(45 * 60)  # past the default point (40 min), before expiry - 10m (50 min)
    late = cache.peek(CacheKey.for_credentials(identity(), SCOPE), refresh_before=timedelta(0))
    assert late.freshness is Freshness.FRESH  # a zero refreshBefore is clamped to the 60 s floor
    ten_minutes = await cache.get(identity(), SCOPE, refresh_before=timedelta(minutes=10))
    assert ten_minutes.freshness is Freshness.FRESH
    assert not ten_minutes.fetched
    assert ten_minutes.refresh_at == START + timedelta(minutes=50)
    default = await cache.get(identity(), SCOPE)
    assert default.fetched
    assert len(fetch.calls) == 2


async def test_jitter_is_the_tokens_own(clock: FakeClock, fetch: CountingFetch) -> None:
    """The same token has the same refresh point everywhere, also after a restart."""
    cache = TokenCache(
        fetch=fetch, refresh_policy=RefreshPolicy(), retry_policy=RetryPolicy(), clock=clock
    )
    first = await cache.get(identity(), SCOPE)
    key = first.key
    assert first.token is not None
    jitter = token_jitter(first.token)
    assert 0.0 <= jitter < 1.0
    assert first.refresh_at == START + timedelta(minutes=40) - timedelta(seconds=30) * jitter
    for _ in range(3):
        assert cache.peek(key).refresh_at == first.refresh_at
        assert (await cache.get(identity(), SCOPE)).refresh_at == first.refresh_at
    restarted = TokenCache(
        fetch=fetch, refresh_policy=RefreshPolicy(), retry_policy=RetryPolicy(), clock=clock
    )
    restarted.seed(key, first.token)
    assert restarted.peek(key).refresh_at == first.refresh_at
    other = AccessToken(
        value="another-token", token_type="Bearer", issued_at=START, expires_at=START
    )
    assert token_jitter(other) != jitter
    cache.close()
    restarted.close()


# Failures: stale but valid, backoff, Retry-After, holds


async def test_failed_refresh_serves_the_old_token_until_it_expires(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    await cache.get(identity(), SCOPE)
    clock.advance(40 * 60)
    fetch.outcomes.append(EndpointUnavailable("down"))
    stale = await cache.get(identity(), SCOPE)
    assert stale.fetched
    assert stale.freshness is Freshness.STALE
    assert stale.token is not None
    assert stale.token.value == "token-1"
    assert isinstance(stale.error, EndpointUnavailable)
    assert stale.failures == 1
    assert stale.last_failure_at == clock.now
    assert stale.next_attempt_at == clock.now + timedelta(seconds=5)

    clock.advance(20 * 60)  # the token's expiry
    fetch.outcomes.append(EndpointUnavailable("still down"))
    gone = await cache.get(identity(), SCOPE)
    assert gone.token is None
    assert gone.freshness is Freshness.NONE
    assert gone.failures == 2
    assert gone.refresh_at is None
    assert str(gone.error) == "still down"
    assert cache.peek(gone.key).token is None


async def test_backoff_no_call_before_next_attempt(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    fetch.outcomes.extend([EndpointUnavailable("1"), EndpointUnavailable("2")])
    first = await cache.get(identity(), SCOPE)
    assert first.freshness is Freshness.NONE
    assert first.failures == 1
    assert first.next_attempt_at == START + timedelta(seconds=5)
    clock.advance(4.9)
    held = await asyncio.gather(*(cache.get(identity(), SCOPE) for _ in range(50)))
    assert len(fetch.calls) == 1
    assert all(not r.fetched and r.failures == 1 and r.error is first.error for r in held)
    clock.advance(0.1)
    second = await cache.get(identity(), SCOPE)
    assert len(fetch.calls) == 2
    assert second.failures == 2
    # Doubled to 10 s, at the low end (random() = 0) of its ±25 % jitter band.
    assert second.next_attempt_at == clock.now + timedelta(seconds=7.5)
    clock.advance(7.4)
    await cache.get(identity(), SCOPE)
    assert len(fetch.calls) == 2
    clock.advance(0.1)
    recovered = await cache.get(identity(), SCOPE)
    assert recovered.token is not None
    assert recovered.error is None
    assert (recovered.failures, recovered.last_failure_at) == (0, None)  # a success resets


async def test_retry_after_is_honoured(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    fetch.outcomes.append(Throttled("slow down", retry_after=120))
    throttled = await cache.get(identity(), SCOPE)
    assert throttled.next_attempt_at == START + timedelta(seconds=120)
    clock.advance(119)
    await cache.get(identity(), SCOPE)
    assert len(fetch.calls) == 1
    clock.advance(1)
    assert (await cache.get(identity(), SCOPE)).token is not None
    assert len(fetch.calls) == 2


@pytest.mark.parametrize("error", [CredentialsRejected("no"), ScopeRejected("no")])
async def test_permanent_failure_is_held_per_key(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch, error: Exception
) -> None:
    fetch.outcomes.append(error)
    rejected = await cache.get(identity(), SCOPE)
    assert rejected.next_attempt_at == START + timedelta(seconds=300)
    clock.advance(299)
    for _ in range(3):
        assert (await cache.get(identity(), SCOPE)).error is error
    assert len(fetch.calls) == 1
    await cache.get(identity(), OTHER_SCOPE)  # another key is not held
    assert len(fetch.calls) == 2
    clock.advance(1)
    assert (await cache.get(identity(), SCOPE)).token is not None
    assert len(fetch.calls) == 3


async def test_rotated_secret_skips_the_permanent_hold(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    fetch.outcomes.extend([CredentialsRejected("expired secret"), CredentialsRejected("typo")])
    await cache.get(identity(secret="old"), SCOPE)
    clock.advance(10)
    await cache.get(identity(secret="old"), SCOPE)
    assert len(fetch.calls) == 1
    typo = await cache.get(identity(secret="new-with-typo"), SCOPE)  # rotated: try at once
    assert len(fetch.calls) == 2
    assert typo.failures == 1  # another credential is another key, with its own record
    await cache.get(identity(secret="new-with-typo"), SCOPE)  # held again, for this secret
    assert len(fetch.calls) == 2
    fixed = await cache.get(identity(secret="new"), SCOPE)
    assert len(fetch.calls) == 3
    assert fixed.token is not None
    assert fixed.error is None
    assert [secret for _, secret, _ in fetch.calls] == ["old", "new-with-typo", "new"]


async def test_a_transient_backoff_holds_the_credential_that_failed(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    fetch.outcomes.append(Throttled("slow down", retry_after=60))
    await cache.get(identity(secret="a"), SCOPE)
    await cache.get(identity(secret="a"), SCOPE)
    assert len(fetch.calls) == 1
    # Another credential is another key: it never inherits (nor shares) this one's state.
    await cache.get(identity(secret="b"), SCOPE)
    assert len(fetch.calls) == 2


async def test_unexpected_fetch_exception_is_a_failure_not_a_crash(
    clock: FakeClock, cache: TokenCache, fetch: CountingFetch
) -> None:
    fetch.outcomes.append(RuntimeError("bug"))
    result = await cache.get(identity(), SCOPE)
    assert isinstance(result.error, RuntimeError)
    assert result.next_attempt_at == START + timedelta(seconds=5)


async def test_a_cancelled_caller_does_not_cancel_the_request(clock: FakeClock) -> None:
    gate = asyncio.Event()
    slow = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, slow)
    first = asyncio.create_task(cache.get(identity(), SCOPE))
    # The request is on its way (and held open) before its first caller gives up.
    await until(lambda: len(slow.calls) == 1, "the request to start")
    first.cancel()
    joining = asyncio.create_task(cache.get(identity(), SCOPE))
    await until(lambda: cache.stats.coalesced == 1, "the second caller to join the request")
    gate.set()
    second = await joining
    assert second.token is not None
    assert second.token.value == "token-1"
    assert len(slow.calls) == 1
    with pytest.raises(asyncio.CancelledError):
        await first
    cache.close()


# Seeding and forgetting


def seeded_token(expires_in: float, value: str = "from-secret") -> AccessToken:
    return AccessToken(
        value=value,
        token_type="Bearer",
        issued_at=START - timedelta(minutes=10),
        expires_at=START + timedelta(seconds=expires_in),
    )


async def test_seed_means_no_request(cache: TokenCache, fetch: CountingFetch) -> None:
    key = CacheKey.for_credentials(identity(), SCOPE)
    cache.seed(key, seeded_token(50 * 60))
    result = await cache.get(identity(), SCOPE)
    assert result.token is not None
    assert result.token.value == "from-secret"
    assert result.freshness is Freshness.FRESH
    assert fetch.calls == []


def _token_value(result: CacheResult) -> str | None:
    return result.token.value if result.token is not None else None


async def test_seed_never_replaces_a_later_expiring_token(cache: TokenCache) -> None:
    key = CacheKey.for_credentials(identity(), SCOPE)
    cache.seed(key, seeded_token(3000, "later"))
    cache.seed(key, seeded_token(1000, "earlier"))
    cache.seed(key, seeded_token(-1, "expired"))
    assert _token_value(cache.peek(key)) == "later"
    cache.seed(key, seeded_token(4000, "latest"))
    assert _token_value(cache.peek(key)) == "latest"


async def test_expired_seed_is_ignored(cache: TokenCache) -> None:
    key = CacheKey.for_credentials(identity(), SCOPE)
    cache.seed(key, seeded_token(0))
    assert cache.peek(key) == CacheResult(
        key=key,
        token=None,
        freshness=Freshness.NONE,
        error=None,
        failures=0,
        last_failure_at=None,
        refresh_at=None,
        next_attempt_at=None,
        fetched=False,
    )


async def test_seeded_token_due_for_refresh_is_refreshed(
    cache: TokenCache, fetch: CountingFetch
) -> None:
    key = CacheKey.for_credentials(identity(), SCOPE)
    cache.seed(key, seeded_token(5 * 60))  # 15-minute token, 5 minutes left: due
    assert cache.peek(key).freshness is Freshness.STALE
    result = await cache.get(identity(), SCOPE)
    assert result.fetched
    assert len(fetch.calls) == 1


async def test_forget(cache: TokenCache, fetch: CountingFetch) -> None:
    result = await cache.get(identity(), SCOPE)
    cache.forget(result.key)
    assert cache.peek(result.key).token is None
    await cache.get(identity(), SCOPE)
    assert len(fetch.calls) == 2


async def test_hits_are_cheap(cache: TokenCache) -> None:
    credentials = identity()
    await cache.get(credentials, SCOPE)
    started = time.perf_counter()
    for _ in range(20_000):
        await cache.get(credentials, SCOPE)
    elapsed = time.perf_counter() - started
    assert cache.stats.hits == 20_000
    assert elapsed < 2.0  # ≈ 100 µs per hit at worst; the bench measures the real figure
