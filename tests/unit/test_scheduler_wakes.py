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


def test_only_a_due_time_earlier_than_all_others_wakes_the_loop() -> None:
    # The loop sleeps until the earliest due time; each look's next refresh (an hour
    # away) must not turn it once per look under a burst.
    async def handle(target: str) -> None:
        pass

    now = _now()
    scheduler: Scheduler[str] = Scheduler(clock=lambda: now, handle=handle)
    wake = scheduler._changed
    scheduler.schedule("orders", now + timedelta(minutes=40))
    assert wake.is_set()  # the first due time
    wake.clear()
    scheduler.schedule("payments", now + timedelta(minutes=50))
    scheduler.reschedule("orders", now + timedelta(hours=1))
    assert not wake.is_set()
    scheduler.schedule("invoices", now + timedelta(minutes=10))
    assert wake.is_set()  # earlier than every other: the loop's sleep is too long now
    wake.clear()
    scheduler.schedule("shipping", now)
    assert wake.is_set()
