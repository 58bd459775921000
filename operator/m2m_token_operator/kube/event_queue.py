"""Events wait in one queue, in the order of their looks, and go out in the background.

A look does not wait for its events (the status is what the TokenRequest's
owners wait for). Each look's events are one entry, posted one after the other;
entries are taken lowest priority first (see `call_priority.event_priority`: the
look's start plus a deferral), by a few workers that exist only while events
are pending. A waiting event costs one small tuple, not a task: a burst of
10,000 TokenRequests leaves 10,000 of them queued for a while.

While looks wait for a slot (`hold`), events are not posted at all, for up to
`MOST_HELD_SECONDS` each: priority decides only who gets a free API slot, but
an event posted beside the looks still costs the operator's loop and the API
server their CPU. In a burst's first seconds the machine is saturated and the
looks queue for their slots (a per-look trace of 10,000 TokenRequests: 0.4-0.8
s to start while each write took 150-170 ms), so the events wait for the looks
to catch up, and then go out as before.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# post(namespace, body, priority): one event; failures are the poster's to log.
Post = Callable[[str, Any, float], Awaitable[None]]

# However busy the looks are, an event waits no longer than this before it may go out.
MOST_HELD_SECONDS = 5.0
# While held, one worker checks this often whether the looks have caught up.
HOLD_CHECK_SECONDS = 0.05


class EventQueue:
    def __init__(
        self,
        post: Post,
        *,
        workers: int,
        hold: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1:
            raise ValueError("an event queue needs at least one worker")
        self._post = post
        self._most_workers = workers
        # (priority, arrival, namespace, bodies, queued at)
        self._pending: list[tuple[float, int, str, tuple[Any, ...], float]] = []
        self._arrival = itertools.count()
        self._workers: set[asyncio.Task[None]] = set()
        self._holder: asyncio.Task[None] | None = None  # the worker waiting out a hold
        self._closed = False
        self.hold = hold  # true while the looks wait for slots: events wait for them
        self._clock = clock

    def put(self, namespace: str, bodies: Sequence[Any], *, priority: float) -> None:
        """Queue one look's events (posted in this order); returns at once."""
        if not bodies or self._closed:
            return
        entry = (priority, next(self._arrival), namespace, tuple(bodies), self._clock())
        heapq.heappush(self._pending, entry)
        if self._holder is None:  # else it starts the workers when the hold ends
            self._start_worker()

    def _start_worker(self) -> None:
        if len(self._workers) < self._most_workers:
            worker = asyncio.get_running_loop().create_task(self._work(), name="m2m-events")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    def _held(self) -> bool:
        if self.hold is None or not self._pending:
            return False
        # The first to go is the oldest look's, and so about the longest held.
        oldest_queued_at = self._pending[0][4]
        return self._clock() - oldest_queued_at < MOST_HELD_SECONDS and self.hold()

    def __len__(self) -> int:
        """Looks whose events are queued, not yet taken by a worker."""
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """Whether any event is still queued or being posted."""
        return bool(self._pending or self._workers)

    async def join(self) -> None:
        """Until every queued event has been posted, or failed, or was dropped."""
        while self._workers:
            await asyncio.wait(set(self._workers))

    def drop_pending(self) -> None:
        """Drop what is not posted yet and stop the posting; new events queue as before."""
        self._pending.clear()
        for worker in self._workers:
            worker.cancel()

    def close(self) -> None:
        """Drop what is not posted yet (the operator stops), as client-go drops them."""
        self._closed = True
        self._pending.clear()
        for worker in self._workers:
            worker.cancel()

    async def _work(self) -> None:
        while self._pending:
            if self._held():
                if self._holder is not None:
                    return  # one worker waits out the hold; the others stop meanwhile
                await self._wait_out_hold()
                continue
            priority, _, namespace, bodies, _ = heapq.heappop(self._pending)
            for body in bodies:
                try:
                    await self._post(namespace, body, priority)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A courtesy: one that fails must not stop the others.
                    logger.exception("Posting an event in %s failed", namespace)

    async def _wait_out_hold(self) -> None:
        self._holder = asyncio.current_task()
        try:
            # Polled: the looks' waits end in many places, and telling this queue from each
            # would cost every look something for a check that one worker makes 20 times a second.
            while self._held():  # noqa: ASYNC110
                await asyncio.sleep(HOLD_CHECK_SECONDS)
        finally:
            self._holder = None
        for _ in range(min(self._most_workers, len(self._pending))):
            self._start_worker()  # the backlog goes out as fast as before
