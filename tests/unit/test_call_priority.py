"""The order in which waiting API calls are sent (`kube/call_priority.py`)."""

from __future__ import annotations

import asyncio

import pytest

from m2m_token_operator.kube.call_priority import (
    CALL_PRIORITY,
    EVENT_DEFERRAL_SECONDS,
    PriorityGate,
    event_priority,
    look_started,
)


async def test_waiting_calls_are_admitted_lowest_priority_first() -> None:
    gate = PriorityGate(1)
    admitted: list[str] = []
    release_first = asyncio.Event()

    async def call(name: str, priority: float, hold: asyncio.Event | None = None) -> None:
        async with gate.slot(priority):
            admitted.append(name)
            if hold is not None:
                await hold.wait()

    first = asyncio.create_task(call("holder", 0.0, release_first))
    await asyncio.sleep(0)
    assert admitted == ["holder"]
    # Arriving in the order young, old, middle, equal-to-old: admitted oldest look first,
    # and among equals in the order they came.
    waiters = [
        asyncio.create_task(call(name, priority))
        for name, priority in [("young", 30.0), ("old", 10.0), ("middle", 20.0), ("old-2", 10.0)]
    ]
    await asyncio.sleep(0)
    assert gate.waiting == 4
    release_first.set()
    await asyncio.gather(first, *waiters)
    assert admitted == ["holder", "old", "old-2", "middle", "young"]
    assert gate.waiting == 0


async def test_no_more_holders_than_slots() -> None:
    gate = PriorityGate(3)
    inside = 0
    most = 0

    async def call(priority: float) -> None:
        nonlocal inside, most
        async with gate.slot(priority):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(call(float(i % 5)) for i in range(20)))
    assert most == 3


async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    gate = PriorityGate(1)
    hold = asyncio.Event()
    admitted: list[str] = []

    async def call(name: str, priority: float) -> None:
        async with gate.slot(priority):
            admitted.append(name)
            if name == "holder":
                await hold.wait()

    holder = asyncio.create_task(call("holder", 0.0))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(call("cancelled", 1.0))
    later = asyncio.create_task(call("later", 2.0))
    await asyncio.sleep(0)
    cancelled.cancel()
    hold.set()
    await asyncio.gather(holder, later)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert admitted == ["holder", "later"]
    # The slot came back: a new call gets in at once.
    await asyncio.wait_for(call("again", 5.0), timeout=1.0)


async def test_a_waiter_cancelled_right_after_admission_hands_its_slot_on() -> None:
    gate = PriorityGate(1)
    admitted: list[str] = []

    async def call(name: str, priority: float) -> None:
        async with gate.slot(priority):
            admitted.append(name)

    holding = gate.slot(0.0)
    await holding.__aenter__()
    unlucky = asyncio.create_task(call("unlucky", 1.0))
    later = asyncio.create_task(call("later", 2.0))
    await asyncio.sleep(0)
    assert gate.waiting == 2
    await holding.__aexit__(None, None, None)  # admits "unlucky" without yielding to it
    unlucky.cancel()  # before it ever runs with its slot
    await asyncio.wait_for(later, timeout=1.0)
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    assert admitted == ["later"]


def test_a_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        PriorityGate(0)


async def test_a_look_gives_its_calls_its_start_time_and_events_come_later() -> None:
    assert CALL_PRIORITY.get() == float("-inf")  # outside a look: before every look
    with look_started(100.0):
        assert CALL_PRIORITY.get() == 100.0
        assert event_priority() == 100.0 + EVENT_DEFERRAL_SECONDS
    assert CALL_PRIORITY.get() == float("-inf")
