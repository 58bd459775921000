"""The peering gate is asked before each handling starts, not only when due work is popped.

A slot freed by a finished handling starts the next queued target (`_finished` →
`_dispatch`): that start, too, must wait while the gate is closed. And a pause
cancels the handlings under way, which are due again for the resume.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from m2m_token_operator.reconcile.scheduler import Scheduler

NOW = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)


class SwitchGate:
    """A gate whose decision the test sets; `confirm_active` reads nothing."""

    def __init__(self) -> None:
        self.active: bool | None = True
        self._opened = asyncio.Event()
        self._opened.set()
        self.confirmations = 0

    async def confirm_active(self) -> bool:
        self.confirmations += 1
        return self.active is True

    async def wait_active(self) -> None:
        await self._opened.wait()

    def close(self) -> None:
        self.active = False
        self._opened.clear()

    def open(self) -> None:
        self.active = True
        self._opened.set()


async def _until(condition: Callable[[], bool]) -> None:
    """Turn the event loop until `condition` holds (a positive signal; 5 s at most)."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the signals are plain state, not events
            await asyncio.sleep(0)


async def test_a_finished_handling_starts_no_queued_target_while_the_gate_is_closed() -> None:
    gate = SwitchGate()
    started: list[str] = []
    release_first = asyncio.Event()

    async def handle(target: str) -> None:
        started.append(target)
        if target == "first":
            await release_first.wait()

    scheduler: Scheduler[str] = Scheduler(
        clock=lambda: NOW, handle=handle, concurrency=1, gate=gate
    )
    scheduler.schedule("first", NOW)
    scheduler.schedule("second", NOW)
    task = asyncio.create_task(scheduler.run())
    try:
        # "first" holds the only slot; "second" waits for it in the queue.
        await _until(lambda: started == ["first"] and scheduler.queued == 1)
        gate.close()  # the replica learns it is paused (no pause() wired here)
        release_first.set()
        # The positive signal: "first" has finished and its slot is free again.
        await _until(lambda: not scheduler._running)
        assert started == ["first"]
        assert scheduler.queued + len(scheduler) == 1  # "second" kept, not dropped

        gate.open()
        await _until(lambda: started == ["first", "second"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_gate_is_asked_right_before_each_handling_starts() -> None:
    gate = SwitchGate()
    started: list[str] = []

    async def handle(target: str) -> None:
        started.append(target)

    scheduler: Scheduler[str] = Scheduler(clock=lambda: NOW, handle=handle, gate=gate)
    scheduler.schedule("orders", NOW)
    task = asyncio.create_task(scheduler.run())
    try:
        await _until(lambda: started == ["orders"])
        # The loop asked before popping it, and the handling asked again before it started.
        assert gate.confirmations >= 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_pause_cancels_the_handlings_under_way_and_they_run_again_on_resume() -> None:
    gate = SwitchGate()
    started: list[str] = []
    cancelled: list[str] = []
    finished: list[str] = []
    hold = asyncio.Event()

    async def handle(target: str) -> None:
        started.append(target)
        try:
            if len(started) == 1:
                await hold.wait()  # the first handling is under way at the pause
        except asyncio.CancelledError:
            cancelled.append(target)
            raise
        finished.append(target)

    clock_now = [NOW]
    scheduler: Scheduler[str] = Scheduler(clock=lambda: clock_now[0], handle=handle, gate=gate)
    scheduler.schedule("orders", NOW)
    task = asyncio.create_task(scheduler.run())
    try:
        await _until(lambda: started == ["orders"])
        gate.close()
        scheduler.pause()
        await _until(lambda: cancelled == ["orders"] and not scheduler._running)
        assert scheduler.due_at("orders") is not None  # due again, for the resume
        assert finished == []

        gate.open()
        await _until(lambda: finished == ["orders"])
        assert started == ["orders", "orders"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_target_woken_again_while_it_waits_in_the_queue_runs_once() -> None:
    """A queued target has not started: that handling sees the second wake's cause too."""
    started: list[str] = []
    release_first = asyncio.Event()

    async def handle(target: str) -> None:
        started.append(target)
        if target == "first":
            await release_first.wait()

    scheduler: Scheduler[str] = Scheduler(clock=lambda: NOW, handle=handle, concurrency=1)
    scheduler.schedule("first", NOW)
    scheduler.schedule("second", NOW)
    task = asyncio.create_task(scheduler.run())
    try:
        await _until(lambda: started == ["first"] and scheduler.queued == 1)
        scheduler.schedule("second", NOW)  # e.g. a fan-out while it waits for a slot
        await _until(lambda: len(scheduler) == 0)  # the loop took the second wake
        assert scheduler.queued == 1
        release_first.set()
        await _until(lambda: not scheduler._running and scheduler.queued == 0)
        assert started == ["first", "second"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_target_woken_while_it_runs_runs_again_after_without_holding_a_slot() -> None:
    started: list[str] = []
    release = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def handle(target: str) -> None:
        started.append(target)
        if started.count(target) == 1:
            await release[target].wait()

    scheduler: Scheduler[str] = Scheduler(clock=lambda: NOW, handle=handle, concurrency=2)
    scheduler.schedule("a", NOW)
    task = asyncio.create_task(scheduler.run())
    try:
        await _until(lambda: started == ["a"])
        scheduler.schedule("a", NOW)  # e.g. a fan-out while "a" is being handled
        scheduler.schedule("b", NOW)
        # The second slot goes to "b", not to a second handling of "a" waiting on the first.
        await _until(lambda: started == ["a", "b"])
        release["a"].set()
        await _until(lambda: started == ["a", "b", "a"])  # after the first one ended
        release["b"].set()
        await _until(lambda: not scheduler._running)
        assert started == ["a", "b", "a"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
