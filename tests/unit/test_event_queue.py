"""The background event queue (`kube/event_queue.py`): order, concurrency, failures, stop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from m2m_token_operator.kube.event_queue import EventQueue


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
