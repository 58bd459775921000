"""Fair dispatch: one namespace's burst of due TokenRequests cannot starve another's refresh.

The clock is fixed (everything is due at once) and the handler blocks until the
test releases it, so what is asserted is which targets got a slot, not timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from m2m_token_operator.reconcile.scheduler import Scheduler

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
Ref = tuple[str, str]


@dataclass
class Blocking:
    """A handler that records starts and holds each target until released."""

    started: list[Ref] = field(default_factory=list)
    release: dict[Ref, asyncio.Event] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, ref: Ref) -> None:
        self.started.append(ref)
        self.changed.set()
        await self.release.setdefault(ref, asyncio.Event()).wait()

    async def wait_started(self, count: int) -> None:
        async def enough() -> None:
            while len(self.started) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(enough(), timeout=5)

    def free(self, ref: Ref) -> None:
        self.release.setdefault(ref, asyncio.Event()).set()


@pytest.fixture
async def running() -> AsyncIterator[tuple[Scheduler[Ref], Blocking]]:
    handler = Blocking()
    scheduler: Scheduler[Ref] = Scheduler(clock=lambda: NOW, handle=handler, concurrency=4)
    task = asyncio.create_task(scheduler.run())
    yield scheduler, handler
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_single_refresh_of_another_namespace_is_not_starved(
    running: tuple[Scheduler[Ref], Blocking],
) -> None:
    scheduler, handler = running
    scheduler.fair_by(lambda ref: ref[0], limit=2)
    for index in range(1000):
        scheduler.schedule(("noisy", f"tr-{index}"), NOW)
    scheduler.schedule(("quiet", "only"), NOW)

    await handler.wait_started(3)
    # Nothing of "noisy" has finished, yet "quiet" runs: "noisy" holds its 2 slots only.
    assert ("quiet", "only") in handler.started
    assert sum(1 for ns, _ in handler.started if ns == "noisy") == 2
    assert scheduler.queued == 998

    # A freed slot of "noisy" goes back to "noisy" (no one else waits), one at a time.
    handler.free(handler.started[0])
    await handler.wait_started(4)
    assert handler.started[-1][0] == "noisy"


async def test_groups_take_turns_for_free_slots(
    running: tuple[Scheduler[Ref], Blocking],
) -> None:
    scheduler, handler = running
    scheduler.fair_by(lambda ref: ref[0], limit=4)
    for index in range(10):
        scheduler.schedule(("a", f"{index}"), NOW)
    for index in range(10):
        scheduler.schedule(("b", f"{index}"), NOW)

    await handler.wait_started(4)
    # Round robin: the four slots are shared two and two, not four of "a".
    assert sorted(ns for ns, _ in handler.started) == ["a", "a", "b", "b"]


async def test_without_groups_it_is_first_come_first_served_within_concurrency(
    running: tuple[Scheduler[Ref], Blocking],
) -> None:
    scheduler, handler = running
    for index in range(6):
        scheduler.schedule(("a", f"{index}"), NOW)

    await handler.wait_started(4)
    assert scheduler.queued == 2  # the concurrency of 4 holds
    handler.free(handler.started[0])
    await handler.wait_started(5)
    assert handler.started == [("a", f"{index}") for index in range(5)]
