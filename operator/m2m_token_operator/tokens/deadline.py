"""A wall-clock deadline for one HTTP exchange, enforced on its socket.

Why: `requests`' timeouts are per socket operation. An endpoint that sends a
byte every few seconds (headers or body) never trips the read timeout, and
holds a fetch worker for as long as it likes; with eight workers, eight such
answers stop every refresh in the cluster. The deadline here bounds the whole
answer: when it passes, the connection's socket is shut down, the blocked read
returns at once, and the caller sees the request fail (`Watchdog.expired`
tells it why).

How: the connection classes below arm the calling thread's `Watchdog` (set by
`watchdog(seconds)`) as soon as the request has been sent, i.e. when the
response is awaited. Connecting is bounded by the connect timeout already.
A connection whose socket was shut down is never reused: urllib3 drops it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_local = threading.local()


class _Reaper:
    """One daemon thread that cuts the sockets whose deadline has passed.

    A `threading.Timer` per request started (and left) an OS thread for every token
    request: at a burst's start, when every new scope is fetched once, a thread each.
    Here one thread sleeps until the earliest deadline; arming and disarming only
    touch a heap under a lock.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        # The heap holds the watchdogs, not their sockets: a disarmed one waiting here
        # for its turn keeps no connection open.
        self._heap: list[tuple[float, int, Watchdog]] = []
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, dog: Watchdog) -> None:
        with self._condition:
            heapq.heappush(self._heap, (deadline, next(self._sequence), dog))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="m2m-request-deadline", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is dog:
                self._condition.notify()  # an earlier deadline than the one slept for

    def _run(self) -> None:
        while True:
            with self._condition:
                while True:
                    # Disarmed ones are dropped as they come up: nothing else reads them.
                    while self._heap and self._heap[0][2].done:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._condition.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        _, _, dog = heapq.heappop(self._heap)
                        break
                    self._condition.wait(delay)
            dog.expire()  # outside the lock: a shutdown may take a moment


_REAPER = _Reaper()


class Watchdog:
    """One exchange's deadline; `expired` once it has cut the connection."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # armed, until disarmed or cut
        self.done = False  # disarmed: the exchange is over, nothing is cut any more

    def arm(self, sock: socket.socket) -> None:
        with self._lock:
            if self.done:
                return
            self._sockets.append(sock)
            first = len(self._sockets) == 1
        if self.deadline - time.monotonic() <= 0:
            self.expire()
        elif first:
            _REAPER.add(self.deadline, self)

    def expire(self) -> None:
        """The deadline has passed: cut every connection armed, once."""
        with self._lock:
            if self.done:
                return
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def disarm(self) -> None:
        with self._lock:
            self.done = True
            self._sockets = []


@contextlib.contextmanager
def watchdog(seconds: float | None) -> Iterator[Watchdog | None]:
    """Arm a deadline for the HTTP exchanges this thread makes inside the block."""
    if seconds is None:
        yield None
        return
    dog = Watchdog(seconds)
    previous = getattr(_local, "watchdog", None)
    _local.watchdog = dog
    try:
        yield dog
    finally:
        _local.watchdog = previous
        dog.disarm()


def _arm_current(sock: socket.socket | None) -> None:
    dog: Watchdog | None = getattr(_local, "watchdog", None)
    if dog is not None and sock is not None:
        dog.arm(sock)


class _DeadlineHTTPConnection(HTTPConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _arm_current(self.sock)
        return super().getresponse(*args, **kwargs)


class _DeadlineHTTPSConnection(HTTPSConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _arm_current(self.sock)
        return super().getresponse(*args, **kwargs)


class _DeadlineHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_POOLS = {"http": _DeadlineHTTPConnectionPool, "https": _DeadlineHTTPSConnectionPool}


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose connections honour the calling thread's `watchdog`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOLS)
        return manager
