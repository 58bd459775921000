"""A wake asked for while a target is being handled is not lost when the handler reschedules."""

import asyncio
from datetime import UTC, datetime, timedelta

from m2m_token_operator.reconcile.scheduler import Scheduler


def _now() -> datetime:
    return datetime.now(UTC)


async def test_a_wake_during_handling_survives_the_handlers_reschedule() -> None:
    handled: list[str] = []
    again = asyncio.Event()

    async def handle(target: str) -> None:
        handled.append(target)
        if len(handled) == 1:
            # A watch event arrives while the target is being handled, and the handling
            # then ends by setting the next due time, an hour away.
            scheduler.schedule(target, _now())
            scheduler.reschedule(target, _now() + timedelta(hours=1))
        else:
            again.set()

    scheduler: Scheduler[str] = Scheduler(clock=_now, handle=handle)
    scheduler.schedule("orders", _now())
    task = asyncio.create_task(scheduler.run())
    try:
        await asyncio.wait_for(again.wait(), timeout=2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert handled == ["orders", "orders"]


async def test_reschedule_still_replaces_a_due_time_still_to_come() -> None:
    async def handle(target: str) -> None:
        pass

    now = _now()
    scheduler: Scheduler[str] = Scheduler(clock=lambda: now, handle=handle)
    scheduler.schedule("orders", now + timedelta(minutes=5))
    scheduler.reschedule("orders", now + timedelta(hours=1))
    assert scheduler.due_at("orders") == now + timedelta(hours=1)
    scheduler.reschedule("orders", None)
    assert scheduler.due_at("orders") is None
