"""Which waiting API call is sent next (a free request slot): the oldest look's first.

Under a burst (a thousand TokenRequests created at once) every look is in
flight together, and each needs several calls one after the other (the Secret,
the status, the event). With a first-come queue in front of the slots, a
look's second call waits behind the first calls of every look that started
after it, so nearly every TokenRequest becomes Ready only near the end of the
burst. Admitting calls by the age of the look they belong to finishes looks in
the order they started, with the same slots just as busy: the work and the
total time stay the same, the wait of each TokenRequest shrinks.

Events are courtesies, posted in the background (the look does not wait for
them): they yield to looks that started up to `EVENT_DEFERRAL_SECONDS` after
theirs, and then get their turn like any other call, so under a burst they
follow the statuses instead of delaying them, and are never starved.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import itertools
import time
from collections.abc import Iterator

# The priority of the API calls made from here on in this task (lower goes first);
# a look sets it to the time it started. Calls outside any look go before every look.
CALL_PRIORITY: contextvars.ContextVar[float] = contextvars.ContextVar(
    "m2m_call_priority", default=float("-inf")
)
EVENT_DEFERRAL_SECONDS = 60.0


@contextlib.contextmanager
def look_started(at: float | None = None) -> Iterator[None]:
    """Within the block, API calls carry the priority of a look that started `at`."""
    token = CALL_PRIORITY.set(time.monotonic() if at is None else at)
    try:
        yield
    finally:
        CALL_PRIORITY.reset(token)


class _Slot:
    """One use of a gate's slot: a class, not an async generator, as every API call
    enters one (a generator-based context manager cost more than the gate itself)."""

    __slots__ = ("_gate", "_priority")

    def __init__(self, gate: PriorityGate, priority: float) -> None:
        self._gate = gate
        self._priority = priority

    async def __aenter__(self) -> None:
        await self._gate._acquire(self._priority)

    async def __aexit__(self, *exc_info: object) -> None:
        self._gate._release()


def event_priority() -> float:
    """An event's priority: after the calls of looks that started shortly after its own."""
    return CALL_PRIORITY.get() + EVENT_DEFERRAL_SECONDS


class PriorityGate:
    """At most `slots` holders at once; waiters are admitted lowest priority first.

    Ties go first come, first served. A waiter that is cancelled leaves the queue; one
    cancelled just after it was admitted hands its slot on.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self._free = slots
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @property
    def waiting(self) -> int:
        """How many wait now (a count for tests and diagnostics: linear in the queue)."""
        return sum(1 for _, _, future in self._waiters if not future.done())

    def slot(self, priority: float) -> _Slot:
        """`async with gate.slot(priority):` holds a slot for the block."""
        return _Slot(self, priority)

    async def _acquire(self, priority: float) -> None:
        # A free slot means nobody is waiting: `_release` hands a slot to a waiter before
        # it frees one (entries left in the heap then are cancelled ones).
        if self._free > 0:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrival), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # admitted, but nobody is left to use the slot
            else:
                future.cancel()  # skipped when its turn comes
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1
