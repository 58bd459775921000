"""Wake each TokenRequest at the moment its token is due, and not before.

Kopf's timers and daemons would add a finalizer to every TokenRequest, so a
TokenRequest could not be deleted while the operator is down. This scheduler
is one asyncio task with a heap of due times: refresh is driven by each
token's own refresh point, with no polling and nothing written to the objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)

Target = TypeVar("Target", bound=Hashable)


class Gate(Protocol):
    """Whether this replica may act (HA peering): due work waits while it may not."""

    async def confirm_active(self) -> bool: ...

    async def wait_active(self) -> None: ...


class Scheduler(Generic[Target]):
    """A due-time heap with lazy cancellation; `run` calls `handle(target)` when one is due."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime],
        handle: Callable[[Target], Awaitable[None]],
        concurrency: int = 16,
        gate: Gate | None = None,
    ) -> None:
        self._clock = clock
        self._handle = handle
        self.gate = gate
        self._heap: list[tuple[datetime, int, Target]] = []
        self._due: dict[Target, datetime] = {}
        self._sequence = itertools.count()
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self.last_loop_at: datetime | None = None  # liveness: the loop is turning

    def schedule(self, target: Target, at: datetime | None) -> None:
        """Set (or with None, cancel) the one due time of a target; an earlier one wins."""
        if at is None:
            self._due.pop(target, None)
            return
        current = self._due.get(target)
        if current is not None and current <= at:
            return
        self._due[target] = at
        heapq.heappush(self._heap, (at, next(self._sequence), target))
        self._changed.set()

    def reschedule(self, target: Target, at: datetime | None) -> None:
        """Replace the due time, later or earlier (after a target was handled).

        A due time that has already come stays: it is a wake asked for while the target
        was being handled (a watch event), and that handling may not have seen its cause.
        """
        current = self._due.get(target)
        if current is not None and current <= self._clock():
            return
        self._due.pop(target, None)
        self.schedule(target, at)

    def due_at(self, target: Target) -> datetime | None:
        return self._due.get(target)

    def __len__(self) -> int:
        return len(self._due)

    def _pop_due(self, now: datetime) -> list[Target]:
        ready: list[Target] = []
        while self._heap and self._heap[0][0] <= now:
            at, _, target = heapq.heappop(self._heap)
            if self._due.get(target) == at:  # otherwise cancelled or moved: a stale entry
                del self._due[target]
                ready.append(target)
        return ready

    def _seconds_to_next(self, now: datetime) -> float | None:
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, (self._heap[0][0] - now).total_seconds())

    async def _run_one(self, target: Target) -> None:
        async with self._slots:
            try:
                await self._handle(target)
            except asyncio.CancelledError:
                raise
            except Exception:
                # One broken TokenRequest must not stop the refreshes of all others.
                logger.exception("Scheduled work for %s failed", target)

    def _has_due(self, now: datetime) -> bool:
        delay = self._seconds_to_next(now)
        return delay is not None and delay <= 0.0

    async def _wait_for_gate(self) -> None:
        """Due work stays due (nothing is dropped) until this replica may act again."""
        assert self.gate is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gate.wait_active(), timeout=30.0)

    async def run(self) -> None:
        try:
            while True:
                now = self._clock()
                self.last_loop_at = now
                if (
                    self.gate is not None
                    and self._has_due(now)
                    and not await self.gate.confirm_active()
                ):
                    await self._wait_for_gate()
                    continue
                for target in self._pop_due(now):
                    task = asyncio.create_task(self._run_one(target))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                delay = self._seconds_to_next(self._clock())
                self._changed.clear()
                # Wake at least every 30 s so that liveness sees a turning loop and a
                # jump of the wall clock (suspend, NTP step) is noticed soon.
                timeout = 30.0 if delay is None else min(delay, 30.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=timeout)
        finally:
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
