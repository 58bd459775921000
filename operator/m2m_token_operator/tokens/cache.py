"""One token per identity and scope, fetched as rarely as the token endpoint allows.

The token endpoint is shared, rate-limited and sometimes down; the workloads
must not notice either. So the cache:

- keys tokens by (token endpoint, client id, scope, credential fingerprint),
  so TokenRequests that present the same credential for the same scope share
  one token, and a credential never gets a token obtained with another;
- runs at most one request per key at a time (single flight): concurrent
  callers wait for the same answer instead of each calling the endpoint;
- serves a token until its refresh point, and after a failed refresh keeps
  serving the old one while it is unexpired (stale but valid), never after;
- remembers failures per key (negative caching): no call before the retry
  policy's next attempt, so many TokenRequests and watch events cannot turn
  one failure into a storm of requests; a permanent failure is held, unless
  the client secret has been rotated since, which is worth trying at once;
- accepts tokens read back from the operator's own Secrets after a restart
  (seeding), so a restart costs no call at all;
- keeps a key's failure record (its hold or backoff) after the last subscriber
  leaves, until that hold or backoff ends, so toggling a TokenRequest's scope
  or identity away and back cannot buy one token request per edit;
- refreshes a shared key at the EARLIEST refresh point its subscribers need
  (`subscribe`), each `refreshBefore` capped at half the token's lifetime: every
  subscriber's Secret gets its token as early as it asked, and no subscriber can
  make a key cost more than two token requests per token lifetime;
- after a failed refresh, retries before the token held expires (the retry
  policy caps the wait by a fraction of the token's remaining lifetime);
- on request (`force`, the `m2m.dev/refresh` annotation) fetches a new token
  although the one held is fresh, at most once per key every `FORCE_INTERVAL`,
  and not while a permanent failure of the same credential is held;
- keeps an entry whose request is in flight when its key is forgotten, so a
  key wanted again meanwhile joins that request (single flight).

Everything runs on the event loop, so no state here needs a lock. At most
`max_requests` requests are in flight at once; the others wait for a slot.
A caller may bound the requests it starts further, and do something while it
waits for one (`Holds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import heapq
import itertools
import logging
import random as _random
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from m2m_token_operator.tokens.credentials import ClientCredentials
from m2m_token_operator.tokens.model import AccessToken, TokenEndpointError, is_permanent
from m2m_token_operator.tokens.timing import RefreshPolicy, RetryPolicy

logger = logging.getLogger(__name__)

# At most one forced fetch per key this often: a burst of refresh requests (many
# TokenRequests sharing a key, a script annotating in a loop) coalesces onto one call.
FORCE_INTERVAL = timedelta(seconds=10)


def _nothing_held() -> AbstractAsyncContextManager[object]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Holds:
    """What a caller of `TokenCache.get` or `force` holds, each entered anew every time.

    `budget`: while a token request this call started runs (entered before one of the
    cache's slots is asked for), e.g. the caller's namespace's share of requests.
    `while_waiting`: while this call waits for a request, its own or another's.
    """

    budget: Callable[[], AbstractAsyncContextManager[object]] = _nothing_held
    while_waiting: Callable[[], AbstractAsyncContextManager[object]] = _nothing_held


NOTHING_HELD = Holds()


def token_jitter(token: AccessToken) -> float:
    """The token's own jitter fraction in [0, 1), derived from the token itself.

    Tokens differ, so their refresh points spread; and the same token always gets
    the same refresh point, also in an operator restarted after it was issued, so
    the restarted operator computes the refresh point it published before.
    """
    digest = hashlib.sha256(token.value.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FetchWithheld(Exception):
    """The fetch sent nothing (this replica paused): no answer, so no failure is recorded."""


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What one token is for.

    The contract's key: (endpoint, client id, scope, credential fingerprint). The
    fingerprint (`ClientCredentials.fingerprint`, a keyed hash of the client secret,
    the private key, or the ServiceAccount's namespace/name/uid) makes a credentials
    Secret that copies another's client id with a wrong secret a different key: it
    is never served the token obtained with the right one. Two namespaces holding
    the very same secret share a token; each could have fetched it itself.
    """

    token_endpoint: str
    client_id: str
    scope: str
    fingerprint: str

    @classmethod
    def for_credentials(cls, credentials: ClientCredentials, scope: str) -> CacheKey:
        return cls(
            credentials.token_endpoint, credentials.client_id, scope, credentials.fingerprint()
        )

    def __str__(self) -> str:
        # A prefix of the fingerprint tells keys apart in logs; it reveals nothing.
        return (
            f"{self.scope} as {self.client_id} at {self.token_endpoint}"
            f" (credential {self.fingerprint[:8]})"
        )


_SHARED = object()  # memo key of a subscribed key's one shared result
# Memo key of a shared key's refresh point; a refresh_before is never this long.
_SHARED_POINT = timedelta.max


class Freshness(enum.Enum):
    FRESH = "fresh"  # before its refresh point
    STALE = "stale"  # due for refresh (the refresh failed or is held back) but not expired
    NONE = "none"  # no unexpired token


@dataclass(frozen=True, slots=True)
class CacheResult:
    key: CacheKey
    token: AccessToken | None  # never an expired token
    freshness: Freshness
    error: Exception | None  # the last attempt's failure; None when it succeeded
    failures: int  # consecutive failures
    last_failure_at: datetime | None
    refresh_at: datetime | None  # when this token is due (for the refresh_before asked)
    next_attempt_at: datetime | None  # the earliest the cache will call the endpoint again
    fetched: bool  # this call started the request whose outcome this is


@dataclass(slots=True)
class CacheStats:
    hits: int = 0  # gets answered FRESH without waiting
    misses: int = 0  # every other get
    requests: int = 0  # calls to `fetch`
    failures: int = 0  # failed calls
    coalesced: int = 0  # gets that waited for another get's request
    held: int = 0  # gets refused a request by backoff or a hold
    forced: int = 0  # forced fetches started (`force`)


@dataclass(slots=True, eq=False)
class _Entry:
    token: AccessToken | None = None
    jitter: float = 0.0  # drawn once per token: every caller sees the same refresh point
    error: Exception | None = None
    failures: int = 0
    last_failure_at: datetime | None = None
    retry_at: datetime | None = None
    failed_fingerprint: str | None = None
    flight: asyncio.Task[None] | None = None
    forced_at: datetime | None = None  # when the last forced fetch started
    # Forgotten while its request was in flight: dropped (or retained) when it lands.
    forgotten: bool = False
    # Memos of pure functions of the fields above; cleared whenever those change.
    refresh_points: dict[timedelta | None, datetime] = field(default_factory=dict)
    fresh_results: dict[object, tuple[datetime, CacheResult]] = field(default_factory=dict)

    def store(self, token: AccessToken, jitter: float) -> None:
        self.token = token
        self.jitter = jitter
        self.refresh_points.clear()
        self.fresh_results.clear()


class KeySubscribers:
    """Who uses each key with which refresh_before, and the refresh point that follows.

    While a key has subscribers, its refresh point follows their refresh_before
    values, whatever refresh_before `get` is passed: with two or more, the earliest
    of their points, each refresh_before capped at half the token's lifetime
    (`RefreshPolicy.shared_refresh_at`).
    """

    def __init__(self, refresh_policy: RefreshPolicy) -> None:
        self._refresh = refresh_policy
        self._by_key: dict[CacheKey, dict[Hashable, timedelta | None]] = {}

    def add(self, key: CacheKey, subscriber: Hashable, refresh_before: timedelta | None) -> bool:
        """Record `subscriber` on `key` with this refresh_before; whether anything changed."""
        subscribers = self._by_key.setdefault(key, {})
        if subscriber in subscribers and subscribers[subscriber] == refresh_before:
            return False
        subscribers[subscriber] = refresh_before
        return True

    def remove(self, key: CacheKey, subscriber: Hashable) -> bool:
        """Take `subscriber` off `key`; whether it was there."""
        subscribers = self._by_key.get(key)
        if subscribers is None or subscriber not in subscribers:
            return False
        del subscribers[subscriber]
        if not subscribers:
            del self._by_key[key]
        return True

    def drop(self, key: CacheKey) -> None:
        self._by_key.pop(key, None)

    @staticmethod
    def changed(entry: _Entry | None) -> None:
        """Forget `entry`'s memos that depended on who subscribes to its key."""
        if entry is not None:
            entry.fresh_results.clear()
            entry.refresh_points.pop(_SHARED_POINT, None)

    def memo_key(self, key: CacheKey, refresh_before: timedelta | None) -> object:
        return _SHARED if self._by_key.get(key) else refresh_before

    def refresh_point(
        self, key: CacheKey, entry: _Entry, token: AccessToken, refresh_before: timedelta | None
    ) -> datetime:
        subscribers = self._by_key.get(key)
        if subscribers is None or len(subscribers) < 2:
            # Alone (or no subscriber): exactly what it asks for.
            before = next(iter(subscribers.values())) if subscribers else refresh_before
            point = entry.refresh_points.get(before)
            if point is None:
                point = self._refresh.refresh_at(
                    token, refresh_before=before, jitter_fraction=entry.jitter
                )
                entry.refresh_points[before] = point
            return point
        shared = entry.refresh_points.get(_SHARED_POINT)
        if shared is None:
            shared = self._refresh.shared_refresh_at(
                token, refresh_befores=set(subscribers.values()), jitter_fraction=entry.jitter
            )
            entry.refresh_points[_SHARED_POINT] = shared
        return shared

    def served(
        self,
        key: CacheKey,
        entry: _Entry,
        *,
        now: datetime,
        refresh_before: timedelta | None,
        fetched: bool,
    ) -> CacheResult:
        """What a subscriber asking with `refresh_before` is served now (a fresh one memoised)."""
        token = entry.token
        if token is not None and token.expired(now):
            entry.token = token = None
            entry.refresh_points.clear()
            entry.fresh_results.clear()
        if token is None:
            return CacheResult(
                key=key,
                token=None,
                freshness=Freshness.NONE,
                error=entry.error,
                failures=entry.failures,
                last_failure_at=entry.last_failure_at,
                refresh_at=None,
                next_attempt_at=entry.retry_at,
                fetched=fetched,
            )
        refresh_at = self.refresh_point(key, entry, token, refresh_before)
        next_attempt = refresh_at if entry.retry_at is None else max(refresh_at, entry.retry_at)
        fresh = now < refresh_at
        result = CacheResult(
            key=key,
            token=token,
            freshness=Freshness.FRESH if fresh else Freshness.STALE,
            error=entry.error,
            failures=entry.failures,
            last_failure_at=entry.last_failure_at,
            refresh_at=refresh_at,
            next_attempt_at=next_attempt,
            fetched=fetched,
        )
        if fresh and not fetched:
            entry.fresh_results[self.memo_key(key, refresh_before)] = (
                refresh_at,
                result,
            )
        return result


class AttemptGate:
    """Whether a key's entry may call the endpoint now: its failures, holds and forced fetches.

    Records each failure with the retry policy's next attempt (backoff, or a hold
    after a permanent failure), clears the record on success, and answers whether
    a `get` is held back, or a `force` is refused by FORCE_INTERVAL, a Retry-After
    or a permanent failure of the same credential.
    """

    def __init__(
        self,
        retry_policy: RetryPolicy,
        clock: Callable[[], datetime],
        random: Callable[[], float],
    ) -> None:
        self._retry = retry_policy
        self._clock = clock
        self._random = random

    @staticmethod
    def forced_until(entry: _Entry) -> datetime | None:
        return None if entry.forced_at is None else entry.forced_at + FORCE_INTERVAL

    @staticmethod
    def retry_after_until(entry: _Entry) -> datetime | None:
        retry_after = getattr(entry.error, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > 0:
            return entry.retry_at
        return None

    def force_allowed_at(self, entry: _Entry) -> datetime | None:
        """The earliest a forced fetch may start for `entry`; None: at once."""
        times = [t for t in (self.forced_until(entry), self.retry_after_until(entry)) if t]
        return max(times) if times else None

    def may_force(self, entry: _Entry, now: datetime) -> bool:
        for until in (self.forced_until(entry), self.retry_after_until(entry)):
            if until is not None and now < until:
                return False
        return True

    def held(self, entry: _Entry, credentials: ClientCredentials, now: datetime) -> bool:
        if entry.retry_at is None or now >= entry.retry_at:
            return False
        if entry.error is not None and is_permanent(entry.error):
            # A rotated secret may be exactly the fix for a rejected one: try it at once.
            return credentials.fingerprint() == entry.failed_fingerprint
        return True

    def held_permanently(
        self, entry: _Entry, credentials: ClientCredentials, now: datetime
    ) -> bool:
        """Held by a permanent failure of this very credential (not by a backoff)."""
        if entry.error is None or not is_permanent(entry.error):
            return False
        return self.held(entry, credentials, now)

    @staticmethod
    def succeeded(entry: _Entry) -> None:
        entry.error = None
        entry.failures = 0
        entry.last_failure_at = None
        entry.retry_at = None
        entry.failed_fingerprint = None

    def failed(self, entry: _Entry, error: Exception, *, fingerprint: str | None) -> None:
        now = self._clock()
        entry.failures += 1
        entry.error = error
        entry.last_failure_at = now
        entry.failed_fingerprint = fingerprint
        held = entry.token
        entry.retry_at = self._retry.next_attempt_at(
            now=now,
            failures=entry.failures,
            error=error,
            jitter_fraction=self._random(),
            # The token still served: the next attempt comes before it expires.
            valid_until=None if held is None or held.expired(now) else held.expires_at,
        )
        entry.fresh_results.clear()


class RetainedFailures:
    """Forgotten keys whose failure record is kept until its hold or backoff ends.

    A TokenRequest that switches its scope or identity away and back must meet the
    same hold, not a fresh request per switch; the record goes once it has passed.
    """

    def __init__(self) -> None:
        self._until: dict[CacheKey, datetime] = {}
        self._heap: list[tuple[datetime, int, CacheKey]] = []
        self._sequence = itertools.count()

    def __contains__(self, key: object) -> bool:
        return key in self._until

    def keep(self, key: CacheKey, entry: _Entry, now: datetime) -> _Entry | None:
        """The failure record to keep of forgotten `entry` while it holds; None: nothing."""
        if entry.retry_at is None or entry.retry_at <= now:
            return None
        if entry.error is None:
            return None
        self._until[key] = entry.retry_at
        heapq.heappush(self._heap, (entry.retry_at, next(self._sequence), key))
        return _Entry(
            error=entry.error,
            failures=entry.failures,
            last_failure_at=entry.last_failure_at,
            retry_at=entry.retry_at,
            failed_fingerprint=entry.failed_fingerprint,
        )

    def release(self, key: CacheKey) -> None:
        """`key` is used again: no longer retained."""
        self._until.pop(key, None)  # the heap's item for it is skipped when popped

    def expired(self, now: datetime) -> list[CacheKey]:
        """Stop retaining the keys whose hold or backoff has ended by `now`; those keys."""
        heap = self._heap
        expired = []
        while heap and heap[0][0] <= now:
            until, _, key = heapq.heappop(heap)
            if self._until.get(key) == until:
                del self._until[key]
                expired.append(key)
        return expired


class TokenCache:
    """Each key's token: fetched by single flight, served while valid, seeded, forgotten.

    Who subscribes to a key and its refresh point are `KeySubscribers`' job; whether
    a request may start, `AttemptGate`'s; a forgotten key's kept failure record,
    `RetainedFailures`'.
    """

    def __init__(
        self,
        *,
        fetch: Callable[[ClientCredentials, str], Awaitable[AccessToken]],
        refresh_policy: RefreshPolicy,
        retry_policy: RetryPolicy,
        clock: Callable[[], datetime],
        random: Callable[[], float] = _random.random,
        jitter_of: Callable[[AccessToken], float] = token_jitter,
        max_requests: int = 8,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._token_jitter = jitter_of
        # Requests in flight at once: a burst of new scopes must not open a connection each.
        self._slots = asyncio.Semaphore(max_requests)
        self._entries: dict[CacheKey, _Entry] = {}
        # Who uses a key, with the refresh_before each asked for (see `subscribe`).
        self._subscribers = KeySubscribers(refresh_policy)
        self._gate = AttemptGate(retry_policy, clock, random)
        # Forgotten keys whose failure record is kept until its hold/backoff ends.
        self._retained = RetainedFailures()
        self.stats = CacheStats()

    def close(self) -> None:
        """Cancel the requests in flight or waiting for a slot (at operator stop)."""
        for entry in self._entries.values():
            if entry.flight is not None:
                entry.flight.cancel()

    async def get(
        self,
        credentials: ClientCredentials,
        scope: str,
        *,
        refresh_before: timedelta | None = None,
        holds: Holds = NOTHING_HELD,
    ) -> CacheResult:
        """The token for this identity and scope, fetched only when due and allowed."""
        key = CacheKey.for_credentials(credentials, scope)
        entry = self._entries.get(key)
        if entry is not None and key not in self._retained and not entry.forgotten:
            memo = entry.fresh_results.get(self._subscribers.memo_key(key, refresh_before))
            if memo is not None and self._clock() < memo[0]:
                self.stats.hits += 1
                return memo[1]
        entry = self._live_entry(key)

        now = self._clock()
        current = self._subscribers.served(
            key, entry, now=now, refresh_before=refresh_before, fetched=False
        )
        if current.freshness is Freshness.FRESH:
            self.stats.hits += 1
            return current
        self.stats.misses += 1
        if entry.flight is None and self._gate.held(entry, credentials, now):
            self.stats.held += 1
            return current
        return await self._join_or_fly(
            key, entry, credentials, scope, holds, refresh_before=refresh_before, name="fetch"
        )

    async def force(
        self,
        credentials: ClientCredentials,
        scope: str,
        *,
        refresh_before: timedelta | None = None,
        holds: Holds = NOTHING_HELD,
    ) -> CacheResult:
        """A new token now, although the one held may be fresh (a forced refresh).

        Single flight with `get`: a request already running for the key is joined,
        not doubled, and its token is the new one. Otherwise one request starts,
        unless the last forced one started less than FORCE_INTERVAL ago (then the
        result says `fetched=False` and the token is the one that request got), or
        the endpoint asked to wait (Retry-After) and that time has not come.
        The transient backoff is bypassed (a person asking is a good moment to try
        again); the hold after a permanent failure is not, unless the credential
        has changed since (a rotated secret is tried at once, as by `get`): a loop
        of annotations on TokenRequests with rejected credentials must not become
        a loop of rejected requests. The caller wakes the key's other subscribers
        when `fetched` is True, as after `get`.
        """
        key = CacheKey.for_credentials(credentials, scope)
        entry = self._live_entry(key)
        now = self._clock()
        if entry.flight is None:
            gate = self._gate
            if not gate.may_force(entry, now) or gate.held_permanently(entry, credentials, now):
                self.stats.held += 1
                return self._subscribers.served(
                    key, entry, now=now, refresh_before=refresh_before, fetched=False
                )
            entry.forced_at = now
            self.stats.forced += 1
        return await self._join_or_fly(
            key, entry, credentials, scope, holds, refresh_before=refresh_before, name="force"
        )

    async def _join_or_fly(
        self,
        key: CacheKey,
        entry: _Entry,
        credentials: ClientCredentials,
        scope: str,
        holds: Holds,
        *,
        refresh_before: timedelta | None,
        name: str,
    ) -> CacheResult:
        """Join the request running for `key`, or start it (single flight); its result."""
        flight = entry.flight
        started = flight is None
        if flight is None:
            flight = asyncio.get_running_loop().create_task(
                self._fly(key, entry, credentials, scope, holds.budget),
                name=f"m2m-token-{name} {key.scope}",
            )
            entry.flight = flight
        else:
            self.stats.coalesced += 1
        async with holds.while_waiting():
            # Shielded: a caller that gives up must not cancel the request others wait for.
            await asyncio.shield(flight)
        return self._subscribers.served(
            key, entry, now=self._clock(), refresh_before=refresh_before, fetched=started
        )

    def force_allowed_at(self, key: CacheKey) -> datetime | None:
        """The earliest a forced fetch may start for `key`; None: at once."""
        entry = self._entries.get(key)
        return None if entry is None else self._gate.force_allowed_at(entry)

    def seed(self, key: CacheKey, token: AccessToken) -> None:
        """Adopt a token read back from an owned Secret, unless a later-expiring one is held."""
        if token.expired(self._clock()):
            return
        entry = self._live_entry(key)
        if entry.token is not None and entry.token.expires_at >= token.expires_at:
            return
        entry.store(token, self._token_jitter(token))

    def peek(self, key: CacheKey, *, refresh_before: timedelta | None = None) -> CacheResult:
        """What `get` would serve without calling anybody."""
        entry = self._entries.get(key)
        if entry is None:
            return CacheResult(
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
        return self._subscribers.served(
            key, entry, now=self._clock(), refresh_before=refresh_before, fetched=False
        )

    def forget(self, key: CacheKey) -> None:
        """Drop the token of a key nobody uses any more; its failure record ends on its own.

        A key whose last attempt failed keeps that record until the hold or backoff it
        set has passed (then it is dropped): a TokenRequest that switches its scope or
        identity away and back must meet the same hold, not a fresh request per switch.
        """
        self._subscribers.drop(key)
        now = self._clock()
        self._prune_retained(now)
        entry = self._entries.get(key)
        if entry is not None and entry.flight is not None:
            # Kept until its request lands: a get meanwhile joins it instead of starting
            # a second request for the same key (`_landed` finishes the forgetting).
            entry.forgotten = True
            return
        self._drop(key, now)

    def _drop(self, key: CacheKey, now: datetime) -> None:
        """Drop `key`'s entry, retaining its failure record until its hold/backoff ends."""
        entry = self._entries.pop(key, None)
        kept = None if entry is None else self._retained.keep(key, entry, now)
        if kept is not None:
            self._entries[key] = kept

    def _prune_retained(self, now: datetime) -> None:
        for key in self._retained.expired(now):
            self._entries.pop(key, None)

    def _live_entry(self, key: CacheKey) -> _Entry:
        """`key`'s entry for a caller that uses it: no longer retained nor forgotten.

        Every path that puts something live in an entry (a request, a token, a forced
        fetch's time) goes through here, so a later prune never evicts it.
        """
        self._retained.release(key)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.forgotten = False
        return entry

    def subscribe(
        self, key: CacheKey, subscriber: Hashable, refresh_before: timedelta | None
    ) -> None:
        """Record that `subscriber` uses `key` with this refresh_before (idempotent).

        While a key has subscribers, its refresh point follows their refresh_before
        values, whatever refresh_before `get` is passed: with two or more, the earliest
        of their points, each refresh_before capped at half the token's lifetime
        (`RefreshPolicy.shared_refresh_at`). The token is shared, so it is refreshed
        once, as early as the neediest subscriber asks, and never more than twice per
        lifetime whatever anyone asks.
        """
        entry = self._entries.get(key)
        if entry is not None and (entry.forgotten or key in self._retained):
            self._live_entry(key)  # used again: its token and records are live
        if self._subscribers.add(key, subscriber, refresh_before):
            KeySubscribers.changed(self._entries.get(key))

    def unsubscribe(self, key: CacheKey, subscriber: Hashable) -> None:
        if self._subscribers.remove(key, subscriber):
            KeySubscribers.changed(self._entries.get(key))

    # Internals: all run on the event loop.

    async def _fly(
        self,
        key: CacheKey,
        entry: _Entry,
        credentials: ClientCredentials,
        scope: str,
        budget: Callable[[], AbstractAsyncContextManager[object]],
    ) -> None:
        self.stats.requests += 1
        try:
            async with budget(), self._slots:
                token = await self._fetch(credentials, scope)
        except FetchWithheld:
            logger.debug("token request for %s withheld: this replica is paused", key)
        except Exception as error:
            if not isinstance(error, TokenEndpointError):
                # A bug, not an endpoint's answer: keep the traceback (it holds no secret).
                logger.exception("unexpected failure fetching the token for %s", key)
            self.stats.failures += 1
            self._gate.failed(entry, error, fingerprint=credentials.fingerprint())
        else:
            entry.store(token, self._token_jitter(token))
            self._gate.succeeded(entry)
        finally:
            entry.flight = None
            if entry.forgotten and self._entries.get(key) is entry:
                # Nobody wanted the key again while the request ran: forget it now.
                self._drop(key, self._clock())
