"""What a caller holds around the cache's token requests (`Holds`), and each namespace's
share of them (`NamespaceBudget`).

Same fake clock and counting fetch as test_cache.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from m2m_token_operator.reconcile.namespace_budget import NamespaceBudget
from m2m_token_operator.tokens.cache import Holds
from tests.unit.test_cache import (
    OTHER_SCOPE,
    SCOPE,
    CountingFetch,
    FakeClock,
    identity,
    make_cache,
    until,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Recorder:
    """Context managers that count who is inside them."""

    def __init__(self) -> None:
        self.entered: dict[str, int] = {"budget": 0, "waiting": 0}
        self.inside: dict[str, int] = {"budget": 0, "waiting": 0}

    def hold(self, name: str) -> contextlib.AbstractAsyncContextManager[object]:
        @contextlib.asynccontextmanager
        async def held() -> AsyncIterator[None]:
            self.entered[name] += 1
            self.inside[name] += 1
            try:
                yield
            finally:
                self.inside[name] -= 1

        return held()

    def holds(self) -> Holds:
        return Holds(budget=lambda: self.hold("budget"), while_waiting=lambda: self.hold("waiting"))


async def test_the_budget_is_held_by_the_request_and_every_caller_waits_outside_it(
    clock: FakeClock,
) -> None:
    gate = asyncio.Event()
    slow = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, slow)
    recorder = Recorder()
    gets = asyncio.gather(*(cache.get(identity(), SCOPE, holds=recorder.holds()) for _ in range(5)))
    await until(lambda: slow.in_flight == 1 and cache.stats.coalesced == 4, "five waiting")
    assert recorder.inside == {"budget": 1, "waiting": 5}  # one request, five waiters
    gate.set()
    await gets
    assert recorder.entered == {"budget": 1, "waiting": 5}
    assert recorder.inside == {"budget": 0, "waiting": 0}

    await cache.get(identity(), SCOPE, holds=recorder.holds())  # a hit waits for nothing
    assert recorder.entered == {"budget": 1, "waiting": 5}
    cache.close()


async def test_a_namespace_budget_bounds_its_requests_and_no_other_namespaces(
    clock: FakeClock,
) -> None:
    gate = asyncio.Event()
    slow = CountingFetch(clock, gate=gate)
    cache = make_cache(clock, slow, max_requests=8)
    budget = NamespaceBudget(1)

    def holds(namespace: str) -> Holds:
        return Holds(budget=lambda: budget.held(namespace))

    shop = [
        asyncio.ensure_future(cache.get(identity(f"client-{index}"), SCOPE, holds=holds("shop")))
        for index in range(3)
    ]
    other = asyncio.ensure_future(cache.get(identity(), OTHER_SCOPE, holds=holds("billing")))
    await until(lambda: slow.in_flight == 2, "one request of each namespace")
    assert budget.in_use("shop") == 3  # one sending, two waiting for the namespace's slot
    assert budget.in_use("billing") == 1
    gate.set()
    await asyncio.gather(*shop, other)
    assert slow.in_flight_peak == 2
    assert len(slow.calls) == 4
    assert len(budget) == 0  # a namespace's share is dropped with its last request
    cache.close()


async def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="would stop every namespace"):
        NamespaceBudget(0)
