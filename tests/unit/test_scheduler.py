"""The scheduler wakes targets at their due time, earliest first, and only once."""

import asyncio
from datetime import UTC, datetime, timedelta

from m2m_token_operator.scheduler import Scheduler


async def test_targets_run_when_due_and_cancelled_ones_never() -> None:
    handled: list[str] = []
    done = asyncio.Event()

    async def handle(target: str) -> None:
        handled.append(target)
        if target == "late":
            done.set()

    now = datetime.now(UTC)
    scheduler: Scheduler[str] = Scheduler(clock=lambda: datetime.now(UTC), handle=handle)
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
    assert scheduler.due_at("moved") is not None
    assert len(scheduler) == 1


async def test_earlier_schedule_wins_and_a_failing_target_does_not_stop_the_loop() -> None:
    handled: list[str] = []
    both = asyncio.Event()

    async def handle(target: str) -> None:
        handled.append(target)
        if len(handled) == 2:
            both.set()
        if target == "boom":
            raise RuntimeError("broken TokenRequest")

    scheduler: Scheduler[str] = Scheduler(clock=lambda: datetime.now(UTC), handle=handle)
    now = datetime.now(UTC)
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
