"""Wake each TokenRequest at the moment its token is due, and not before.

Kopf's timers and daemons would add a finalizer to every TokenRequest, so a
TokenRequest could not be deleted while the operator is down. This scheduler
is one asyncio task with a heap of due times: refresh is driven by each
token's own refresh point, with no polling and nothing written to the objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from m2m_token_operator.reconcile import metrics

logger = logging.getLogger(__name__)

Target = TypeVar("Target", bound=Hashable)


class Gate(Protocol):
    """Whether this replica may act (HA peering): due work waits while it may not."""

    @property
    def active(self) -> bool | None:
        """The last decision, without reading anything (None: not decided yet)."""
        ...

    async def confirm_active(self) -> bool: ...

    async def wait_active(self) -> None: ...


def _one_group(_: object) -> Hashable:
    return None


_NOT_LENT = object()
_Waiter = tuple[asyncio.Task[None], asyncio.Future[None]]  # a lent slot's task, and its return


class Slots:
    """Who holds the scheduler's slots, in all and per group; lent slots and their return.

    A handling may lend its slot while it waits for something the slots do not bound
    (see `Scheduler.slot_lent`); when done waiting it takes a slot back before anything
    new starts, within its group's limit, in the order the waits ended.
    """

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.group_limit = concurrency
        self.held = 0
        self._by_group: Counter[Hashable] = Counter()
        self._lent: dict[asyncio.Task[None], Hashable] = {}
        # Per group, so that taking back costs the number of groups, not of waiters.
        self._taking_back: dict[Hashable, deque[_Waiter]] = {}

    @property
    def lent(self) -> int:
        return len(self._lent)

    @property
    def taking_back(self) -> bool:
        """Whether some handling waits to take its slot back."""
        return bool(self._taking_back)

    def is_lent(self, task: asyncio.Task[None]) -> bool:
        return task in self._lent

    def room(self) -> bool:
        return self.held < self.concurrency

    def group_room(self, group: Hashable) -> bool:
        return self._by_group[group] < self.group_limit

    def take(self, group: Hashable) -> None:
        self.held += 1
        self._by_group[group] += 1

    def release(self, group: Hashable) -> None:
        self.held -= 1
        self._by_group[group] -= 1
        if self._by_group[group] <= 0:
            del self._by_group[group]

    def lend(self, task: asyncio.Task[None], group: Hashable) -> None:
        self._lent[task] = group
        self.release(group)

    def ask_back(self, task: asyncio.Task[None]) -> asyncio.Future[None]:
        """Done when the slot is the task's again (at once if there is room)."""
        returned: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._taking_back.setdefault(self._lent[task], deque()).append((task, returned))
        self.give_back()
        return returned

    def give_back(self) -> None:
        """Slots to the waits that ended, in order within a group; the groups in turn."""
        for group in list(self._taking_back):
            if not self.room():
                return
            waiting = self._taking_back.pop(group)
            while waiting and self.room() and self.group_room(group):
                task, returned = waiting.popleft()
                if returned.done() or task not in self._lent:
                    continue  # cancelled while waiting
                del self._lent[task]
                self.take(group)
                returned.set_result(None)
            if waiting:
                self._taking_back[group] = waiting  # behind the other groups now

    def take_back_now(self, task: asyncio.Task[None]) -> None:
        """Over the limit for a moment (if it was still lent): only to end the handling."""
        group = self._lent.pop(task, _NOT_LENT)
        if group is not _NOT_LENT:
            self.take(group)

    def finished(self, task: asyncio.Task[None], group: Hashable) -> None:
        if self._lent.pop(task, _NOT_LENT) is _NOT_LENT:  # else: lent, never taken back
            self.release(group)


class Scheduler(Generic[Target]):
    """A due-time heap with lazy cancellation; `run` calls `handle(target)` when one is due.

    With a `gate` (HA peering), the gate is asked before EACH handling starts, whoever
    asked for it and however it is started (the loop, or a slot freed by another
    handling): a paused replica starts nothing. `pause()` also cancels the handlings
    under way, so that none of them writes after this replica learnt it is paused.
    """

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
        self._slots = Slots(concurrency)
        self._running: dict[asyncio.Task[None], Target] = {}
        # Fair dispatch (see `fair_by`): due targets queue per group, groups take turns.
        self._group_of: Callable[[Target], Hashable] = _one_group
        self._queues: dict[Hashable, deque[Target]] = {}
        # The targets in `_queues`, each at most once, with when they were queued.
        self._queued: dict[Target, float] = {}
        self._running_targets: set[Target] = set()
        self._rerun: set[Target] = set()  # woken while running: queued when that ends
        self._turns: deque[Hashable] = deque()  # groups with queued targets, next first
        self._stopping = False
        self.last_loop_at: datetime | None = None  # liveness: the loop is turning

    def fair_by(self, group_of: Callable[[Target], Hashable], *, limit: int) -> None:
        """Share the `concurrency` slots fairly between groups (e.g. namespaces).

        Without it due targets run first come, first served: a namespace with 1,000 due
        TokenRequests would hold every slot (and every token request behind them) while
        another namespace's single refresh waits for all of them. With it, due targets
        queue per group, a free slot goes to the next group in turn (round robin), and no
        group holds more than `limit` slots at once, so one group's burst delays another's
        refresh by at most one look, never by the burst.
        """
        self._group_of = group_of
        self._slots.group_limit = max(1, min(limit, self._slots.concurrency))

    def schedule(self, target: Target, at: datetime | None) -> None:
        """Set (or with None, cancel) the one due time of a target; an earlier one wins."""
        if at is None:
            self._due.pop(target, None)
            return
        current = self._due.get(target)
        if current is not None and current <= at:
            return
        earliest = self._heap[0][0] if self._heap else None
        self._due[target] = at
        heapq.heappush(self._heap, (at, next(self._sequence), target))
        if earliest is None or at < earliest:
            # The loop sleeps until the earliest due time it saw (or a stale entry's, which
            # only wakes it early): a later one, such as each look's next refresh, needs
            # no turn of the loop.
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
                metrics.REFRESH_LAG.observe(max(0.0, (now - at).total_seconds()))
        return ready

    def _seconds_to_next(self, now: datetime) -> float | None:
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, (self._heap[0][0] - now).total_seconds())

    def _may_start(self) -> bool:
        """The gate's last decision: a closed (or undecided) gate starts nothing new."""
        return self.gate is None or self.gate.active is True

    async def _run_one(self, target: Target) -> None:
        try:
            # Asked right before the handling starts (a reading at most about a second
            # old): the decision `_dispatch` saw may be older than the pause.
            if self.gate is not None and not await self.gate.confirm_active():
                self.schedule(target, self._clock())  # still due: it runs after the resume
                return
            await self._handle(target)
        except asyncio.CancelledError:
            raise
        except Exception:
            # One broken TokenRequest must not stop the refreshes of all others.
            logger.exception("Scheduled work for %s failed", target)

    def _enqueue(self, target: Target) -> None:
        if target in self._queued:
            return  # it has not started yet: that handling will see this wake's cause too
        if target in self._running_targets:
            # Again once the running handling ends (it may not have seen this wake's cause),
            # without holding a slot meanwhile only to wait for the target's lock.
            self._rerun.add(target)
            return
        self._queued[target] = time.monotonic()
        group = self._group_of(target)
        queue = self._queues.get(group)
        if queue is None:
            queue = self._queues[group] = deque()
            self._turns.append(group)
        queue.append(target)

    def _dispatch(self) -> None:
        """Start queued targets while slots are free, one group after the other."""
        self._slots.give_back()  # a continuation, not a start: the gate is not asked
        if not self._may_start():
            if self._queues:
                self._changed.set()  # the loop waits on the gate for them, and goes on
            return
        skipped = 0  # groups passed over in a row because they are at their limit
        while self._turns and self._slots.room():
            if skipped >= len(self._turns):
                return  # every waiting group is at its limit
            group = self._turns[0]
            if not self._slots.group_room(group):
                self._turns.rotate(-1)
                skipped += 1
                continue
            skipped = 0
            queue = self._queues[group]
            target = queue.popleft()
            metrics.SLOT_WAIT_TO_START.observe(time.monotonic() - self._queued.pop(target))
            if queue:
                self._turns.rotate(-1)  # its next target waits for the others' turns
            else:
                self._turns.popleft()
                del self._queues[group]
            self._slots.take(group)
            task = asyncio.create_task(self._run_one(target))
            self._running[task] = target
            self._running_targets.add(target)
            task.add_done_callback(functools.partial(self._finished, group=group))

    def _finished(self, task: asyncio.Task[None], *, group: Hashable) -> None:
        target = self._running.pop(task, None)
        self._slots.finished(task, group)
        if target is not None:
            self._running_targets.discard(target)
            if target in self._rerun and not self._stopping:
                self._rerun.discard(target)
                self._enqueue(target)  # woken while it ran
        if task.cancelled() and target is not None and not self._stopping:
            self.schedule(target, self._clock())  # cut short by a pause: due again
        self._dispatch()  # asks the gate first: a paused replica starts nothing here

    @contextlib.asynccontextmanager
    async def slot_lent(self) -> AsyncIterator[None]:
        """While the handling waits inside this block, its slot serves someone else.

        For a wait that is neither this replica's work nor bounded by the slots: a token
        request's result. An endpoint that hangs for one tenant then holds none of the
        looks, only its token requests (which have their own bound), and a burst's looks
        of already fetched keys go on meanwhile. The slot is taken back at the end of
        the block, before anything new starts, within the group's limit; a handling
        ended by an error or a cancellation takes it back at once, to finish.
        Outside a handling of this scheduler (or nested), nothing is lent.
        """
        task = asyncio.current_task()
        if task is None or task not in self._running or self._slots.is_lent(task):
            yield
            return
        self._slots.lend(task, self._group_of(self._running[task]))
        self._dispatch()
        try:
            yield
        except BaseException:
            self._slots.take_back_now(task)
            raise
        answered = time.monotonic()
        try:
            await self._slots.ask_back(task)
            metrics.SLOT_WAIT_TO_RETURN.observe(time.monotonic() - answered)
        except BaseException:
            self._slots.take_back_now(task)  # unless given back meanwhile
            raise

    @property
    def lent(self) -> int:
        """Handlings waiting without a slot (for a token request's result)."""
        return self._slots.lent

    def pause(self) -> None:
        """The gate closed: cancel the handlings under way; what they were doing is due again.

        A handling cancelled while it waits (for an API call's turn, a token request's
        result, the lock of its object) sends nothing more; an API call or token request
        already running in a thread finishes, its result unused. Queued targets go back
        to the heap, so that the loop waits on the gate for them and the resume starts
        them (and a target queued twice runs once).
        """
        now = self._clock()
        for queue in self._queues.values():
            for target in queue:
                self.schedule(target, now)
        self._queues.clear()
        self._queued.clear()
        self._turns.clear()
        for task in list(self._running):
            task.cancel()

    @property
    def queued(self) -> int:
        """Due targets waiting for a slot."""
        return sum(len(queue) for queue in self._queues.values())

    def waiting_for_slots(self) -> bool:
        """Whether a handling waits for a slot, to start or to go on (cheap: no counting)."""
        return bool(self._queued) or self._slots.taking_back

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
                    and (self._has_due(now) or self._queues)
                    and not await self.gate.confirm_active()
                ):
                    await self._wait_for_gate()
                    continue
                for target in self._pop_due(now):
                    self._enqueue(target)
                self._dispatch()
                delay = self._seconds_to_next(self._clock())
                self._changed.clear()
                # Wake at least every 30 s so that liveness sees a turning loop and a
                # jump of the wall clock (suspend, NTP step) is noticed soon.
                timeout = 30.0 if delay is None else min(delay, 30.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=timeout)
        finally:
            self._stopping = True
            self._queues.clear()  # nothing new starts while the running ones stop
            self._queued.clear()
            self._turns.clear()
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
