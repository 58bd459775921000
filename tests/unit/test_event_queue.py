"""The background event queue (`kube/event_queue.py`): order, concurrency, failures, stop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from m2m_token_operator.kube.event_queue import MOST_HELD_SECONDS, EventQueue
from tests.unit.test_cache import until


class Poster:
    """Records what is posted; each post waits until `release` is set."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, Any, float]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self.fail: set[Any] = set()

    async def __call__(self, namespace: str, body: Any, priority: float) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            if body in self.fail:
                raise RuntimeError("the API server said no")
            self.posted.append((namespace, body, priority))
        finally:
            self.in_flight -= 1


async def test_looks_are_taken_lowest_priority_first_and_their_events_in_order() -> None:
    poster = Poster()
    queue = EventQueue(poster, workers=1)
    queue.put("ns", ["late-1", "late-2"], priority=30.0)
    queue.put("ns", ["early-1", "early-2", "early-3"], priority=10.0)
    queue.put("ns", ["middle"], priority=20.0)
    assert len(queue) == 3  # the worker has not run yet
    poster.release.set()
    await asyncio.wait_for(queue.join(), timeout=1)
    bodies = [body for _, body, _ in poster.posted]
    assert bodies == ["early-1", "early-2", "early-3", "middle", "late-1", "late-2"]
    assert [priority for _, _, priority in poster.posted] == [10.0] * 3 + [20.0] + [30.0] * 2


async def test_no_more_events_in_flight_than_workers() -> None:
    poster = Poster()
    queue = EventQueue(poster, workers=3)
    for n in range(10):
        queue.put("ns", [f"event-{n}"], priority=float(n))
    await asyncio.sleep(0)
    assert poster.in_flight == 3
    poster.release.set()
    await asyncio.wait_for(queue.join(), timeout=1)
    assert poster.most_in_flight == 3
    assert sorted(body for _, body, _ in poster.posted) == sorted(f"event-{n}" for n in range(10))
    assert not queue.busy


async def test_a_failing_event_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    poster = Poster()
    poster.fail.add("bad")
    poster.release.set()
    queue = EventQueue(poster, workers=1)
    queue.put("ns", ["bad", "good"], priority=1.0)
    queue.put("ns", ["next"], priority=2.0)
    await asyncio.wait_for(queue.join(), timeout=1)
    assert [body for _, body, _ in poster.posted] == ["good", "next"]
    assert "Posting an event in ns failed" in caplog.text


async def test_close_drops_what_is_not_posted_and_takes_no_more() -> None:
    poster = Poster()
    queue = EventQueue(poster, workers=1)
    queue.put("ns", ["taken"], priority=1.0)
    queue.put("ns", ["queued"], priority=2.0)
    await asyncio.sleep(0)
    assert poster.in_flight == 1  # "taken" is being posted
    queue.close()
    queue.put("ns", ["after"], priority=0.0)
    await asyncio.wait_for(queue.join(), timeout=1)
    poster.release.set()
    assert poster.posted == []
    assert len(queue) == 0


def test_a_queue_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        EventQueue(Poster(), workers=0)


class Looks:
    """The hold: busy for the first `busy_checks` times it is asked; what was posted then."""

    def __init__(self, poster: Poster, busy_checks: int) -> None:
        self.poster = poster
        self.busy_checks = busy_checks
        self.asked = 0
        self.posted_while_busy: list[int] = []

    def __call__(self) -> bool:
        self.asked += 1
        busy = self.asked <= self.busy_checks
        if busy:
            self.posted_while_busy.append(len(self.poster.posted))
        return busy


async def test_while_the_looks_wait_for_slots_no_event_goes_out_and_then_all_do() -> None:
    poster = Poster()
    looks = Looks(poster, busy_checks=4)
    queue = EventQueue(poster, workers=3, hold=looks)
    for n in range(5):
        queue.put("ns", [f"event-{n}"], priority=float(n))
    # The backlog goes out with every worker again once the looks caught up.
    await until(lambda: poster.in_flight == 3, "three events in flight")
    # It was asked before any post until it said "not busy": nothing went out meanwhile.
    assert looks.posted_while_busy == [0, 0, 0, 0]
    assert looks.asked > 4
    poster.release.set()
    await asyncio.wait_for(queue.join(), timeout=5)
    assert sorted(body for _, body, _ in poster.posted) == [f"event-{n}" for n in range(5)]
    assert not queue.busy


async def test_an_event_is_held_for_a_few_seconds_at_most_however_busy_the_looks() -> None:
    poster = Poster()
    poster.release.set()
    now = [100.0]
    looks = Looks(poster, busy_checks=10**9)  # always busy
    queue = EventQueue(poster, workers=2, hold=looks, clock=lambda: now[0])
    queue.put("ns", ["old"], priority=1.0)
    await until(lambda: looks.asked >= 2, "held, and still held at the next check")
    now[0] += MOST_HELD_SECONDS
    await asyncio.wait_for(queue.join(), timeout=5)
    assert [body for _, body, _ in poster.posted] == ["old"]
