"""The scheduler wakes targets at their due time, earliest first, and only once.

The event loop runs on looptime's fake time and the scheduler's clock follows it:
the due times are real to the scheduler, and the tests take no wall-clock time.
"""

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from m2m_token_operator.reconcile.scheduler import Scheduler

START = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)


def loop_clock() -> Callable[[], datetime]:
    """The wall clock as the (fake-time) event loop sees it."""
    loop = asyncio.get_running_loop()
    origin = loop.time()
    return lambda: START + timedelta(seconds=loop.time() - origin)


@pytest.mark.looptime
async def test_targets_run_when_due_and_cancelled_ones_never() -> None:
    handled: list[str] = []
    handled_at: dict[str, timedelta] = {}
    done = asyncio.Event()
    clock = loop_clock()
    now = clock()

    async def handle(target: str) -> None:
        handled.append(target)
        handled_at[target] = clock() - now
        if target == "late":
            done.set()

    scheduler: Scheduler[str] = Scheduler(clock=clock, handle=handle)
    scheduler.schedule("late", now + timedelta(milliseconds=300))
    scheduler.schedule("early", now + timedelta(milliseconds=50))
    scheduler.schedule("cancelled", now + timedelta(milliseconds=100))
    scheduler.schedule("cancelled", None)
    scheduler.schedule("moved", now + timedelta(milliseconds=100))
    scheduler.reschedule("moved", now + timedelta(hours=1))
    task = asyncio.create_task(scheduler.run())
    await asyncio.wait_for(done.wait(), timeout=5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert handled == ["early", "late"]
    # When due, not before (and on fake time, not much after either).
    assert timedelta(milliseconds=50) <= handled_at["early"] < timedelta(milliseconds=100)
    assert timedelta(milliseconds=300) <= handled_at["late"] < timedelta(milliseconds=350)
    assert scheduler.due_at("moved") is not None
    assert len(scheduler) == 1


@pytest.mark.looptime
async def test_earlier_schedule_wins_and_a_failing_target_does_not_stop_the_loop() -> None:
    handled: list[str] = []
    both = asyncio.Event()

    async def handle(target: str) -> None:
        handled.append(target)
        if len(handled) == 2:
            both.set()
        if target == "boom":
            raise RuntimeError("broken TokenRequest")

    clock = loop_clock()
    scheduler: Scheduler[str] = Scheduler(clock=clock, handle=handle)
    now = clock()
    scheduler.schedule("ok", now + timedelta(hours=1))
    scheduler.schedule("ok", now + timedelta(milliseconds=80))  # earlier wins
    scheduler.schedule("ok", now + timedelta(hours=2))  # later is ignored
    scheduler.schedule("boom", now)
    task = asyncio.create_task(scheduler.run())
    await asyncio.wait_for(both.wait(), timeout=5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert handled == ["boom", "ok"]
    assert scheduler.last_loop_at is not None


@pytest.mark.looptime
async def test_a_wall_clock_jump_forward_is_noticed_within_one_turn() -> None:
    """A suspended VM or an NTP step moves the wall clock, not the loop's monotonic time:
    work that became due by the jump runs at the next turn (at most 30 s), not an hour
    of monotonic time later."""
    loop = asyncio.get_running_loop()
    jump = timedelta(0)
    origin = loop.time()

    def clock() -> datetime:
        return START + timedelta(seconds=loop.time() - origin) + jump

    handled_at: list[float] = []
    done = asyncio.Event()

    async def handle(target: str) -> None:
        handled_at.append(loop.time() - origin)
        done.set()

    scheduler: Scheduler[str] = Scheduler(clock=clock, handle=handle)
    scheduler.schedule("refresh", START + timedelta(hours=1))
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(1)
    jump = timedelta(hours=1)  # the wall clock steps forward; nothing wakes the scheduler
    await asyncio.wait_for(done.wait(), timeout=60)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert 1 <= handled_at[0] <= 31  # the next 30 s turn, not 3,600 s of loop time
