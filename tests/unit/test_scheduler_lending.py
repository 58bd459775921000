"""A handling that waits for a token request lends its slot (`Scheduler.slot_lent`).

As in test_scheduler_fairness.py: the clock is fixed and each handler waits until
the test releases it, so what is asserted is who holds a slot, not timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from m2m_token_operator.reconcile.scheduler import Scheduler
from tests.unit.test_cache import until

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
Ref = tuple[str, str]


@dataclass
class Lending:
    """Each handling lends its slot until `answer(ref)`, then holds it until `free(ref)`."""

    scheduler: Scheduler[Ref] | None = None
    started: list[Ref] = field(default_factory=list)
    resumed: list[Ref] = field(default_factory=list)
    finished: list[Ref] = field(default_factory=list)
    answers: dict[Ref, asyncio.Event] = field(default_factory=dict)
    releases: dict[Ref, asyncio.Event] = field(default_factory=dict)

    async def __call__(self, ref: Ref) -> None:
        assert self.scheduler is not None
        self.started.append(ref)
        try:
            async with self.scheduler.slot_lent():
                await self.answers.setdefault(ref, asyncio.Event()).wait()
            self.resumed.append(ref)
            await self.releases.setdefault(ref, asyncio.Event()).wait()
        finally:
            self.finished.append(ref)

    def answer(self, ref: Ref) -> None:
        self.answers.setdefault(ref, asyncio.Event()).set()

    def free(self, ref: Ref) -> None:
        self.releases.setdefault(ref, asyncio.Event()).set()


@pytest.fixture
async def lending() -> AsyncIterator[tuple[Scheduler[Ref], Lending]]:
    handler = Lending()
    scheduler: Scheduler[Ref] = Scheduler(clock=lambda: NOW, handle=handler, concurrency=4)
    handler.scheduler = scheduler
    scheduler.fair_by(lambda ref: ref[0], limit=1)
    task = asyncio.create_task(scheduler.run())
    yield scheduler, handler
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def three_lending(scheduler: Scheduler[Ref], handler: Lending) -> list[Ref]:
    """Three targets of one group scheduled; once all three have started."""
    refs = [("shop", f"tr-{index}") for index in range(3)]
    for ref in refs:
        scheduler.schedule(ref, NOW)
    await until(lambda: len(handler.started) == 3, "three started")
    return refs


async def test_a_waiting_handling_lets_the_next_of_its_group_start(
    lending: tuple[Scheduler[Ref], Lending],
) -> None:
    scheduler, handler = lending
    # A group limit of 1, yet all three start: each lends its slot while it waits.
    await three_lending(scheduler, handler)
    assert scheduler.lent == 3
    assert scheduler.queued == 0


async def test_a_slot_is_taken_back_within_the_group_limit_in_the_order_waits_ended(
    lending: tuple[Scheduler[Ref], Lending],
) -> None:
    scheduler, handler = lending
    refs = await three_lending(scheduler, handler)

    handler.answer(refs[2])
    handler.answer(refs[0])
    await until(lambda: handler.resumed == [refs[2]], "one resumed")
    # The group's one slot is taken: tr-0's answer came, but it waits for the slot.
    assert scheduler.lent == 2

    handler.free(refs[2])
    await until(lambda: handler.resumed == [refs[2], refs[0]], "tr-0 resumed")
    assert scheduler.lent == 1


async def test_taking_back_comes_before_anything_new_starts(
    lending: tuple[Scheduler[Ref], Lending],
) -> None:
    scheduler, handler = lending
    first, second, third = (("shop", name) for name in ("first", "second", "third"))
    scheduler.schedule(first, NOW)
    scheduler.schedule(second, NOW)
    await until(lambda: len(handler.started) == 2, "both started")
    handler.answer(first)
    await until(lambda: handler.resumed == [first], "first resumed")
    scheduler.schedule(third, NOW)
    await until(lambda: scheduler.queued == 1, "third queued")
    handler.answer(second)  # it wants the slot "first" holds, as "third" does

    handler.free(first)
    await until(lambda: handler.resumed == [first, second], "second resumed")
    assert third not in handler.started  # the one slot went to "second"
    handler.free(second)
    await until(lambda: third in handler.started, "third started")


async def test_other_groups_are_not_held_by_a_group_waiting_for_answers(
    lending: tuple[Scheduler[Ref], Lending],
) -> None:
    scheduler, handler = lending
    for index in range(10):
        scheduler.schedule(("noisy", f"tr-{index}"), NOW)
    await until(lambda: len(handler.started) == 10, "noisy started")
    scheduler.schedule(("quiet", "only"), NOW)
    await until(lambda: ("quiet", "only") in handler.started, "quiet started")


async def test_a_pause_cancels_lent_handlings_and_leaves_every_slot_free(
    lending: tuple[Scheduler[Ref], Lending],
) -> None:
    scheduler, handler = lending
    refs = await three_lending(scheduler, handler)
    handler.answer(refs[0])
    handler.answer(refs[1])  # waits for the slot tr-0 holds
    await until(lambda: handler.resumed == [refs[0]], "tr-0 resumed")

    scheduler.pause()  # no gate: due again at once, and started again
    handler.answers.clear()  # before the loop turns: the new handlings wait for answers
    await until(lambda: len(handler.finished) == 3, "all ended")
    await until(lambda: len(handler.started) == 6, "started again")
    # The slots came back: the three started again, all lending (none took one back).
    assert sorted(handler.started[3:]) == refs
    assert scheduler.lent == 3


async def test_outside_a_handling_nothing_is_lent() -> None:
    scheduler: Scheduler[Ref] = Scheduler(clock=lambda: NOW, handle=lambda _: asyncio.sleep(0))
    async with scheduler.slot_lent():
        assert scheduler.lent == 0


def slot_waits(wait: str) -> tuple[float, float]:
    """(count, sum) of the looks' slot waits of one kind so far."""
    labels = {"wait": wait}
    count = REGISTRY.get_sample_value("m2m_look_slot_wait_seconds_count", labels) or 0.0
    total = REGISTRY.get_sample_value("m2m_look_slot_wait_seconds_sum", labels) or 0.0
    return count, total


async def test_the_waits_for_a_slot_to_start_and_to_go_on_are_measured(
    lending: tuple[Scheduler[Ref], Lending],
) -> None:
    scheduler, handler = lending
    starts_before, _ = slot_waits("start")
    returns_before, returned_before = slot_waits("return")
    refs = await three_lending(scheduler, handler)
    assert slot_waits("start")[0] == starts_before + 3

    handler.answer(refs[1])
    handler.answer(refs[0])  # waits for the group's one slot, which tr-1 takes
    await until(lambda: handler.resumed == [refs[1]], "tr-1 resumed")
    handler.free(refs[1])
    await until(lambda: handler.resumed == [refs[1], refs[0]], "tr-0 resumed")

    returns, returned = slot_waits("return")
    assert returns == returns_before + 2
    assert returned > returned_before  # tr-0's wait for the slot tr-1 held


async def test_it_tells_when_a_handling_waits_for_a_slot_to_start_or_to_go_on(
    lending: tuple[Scheduler[Ref], Lending],
) -> None:
    scheduler, handler = lending
    refs = await three_lending(scheduler, handler)
    assert not scheduler.waiting_for_slots()  # all three lent theirs: nobody waits

    handler.answer(refs[1])
    handler.answer(refs[0])  # waits to take back the group's one slot, which tr-1 takes
    await until(lambda: handler.resumed == [refs[1]], "tr-1 resumed")
    assert scheduler.waiting_for_slots()

    later = ("shop", "later")
    handler.free(refs[1])
    await until(lambda: handler.resumed == [refs[1], refs[0]], "tr-0 resumed")
    scheduler.schedule(later, NOW)  # the group's slot is tr-0's: "later" waits to start
    await until(lambda: scheduler.queued == 1, "later queued")
    assert scheduler.waiting_for_slots()

    handler.free(refs[0])
    await until(lambda: later in handler.started, "later started")
    assert not scheduler.waiting_for_slots()
