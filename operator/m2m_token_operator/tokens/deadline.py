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
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_local = threading.local()


class Watchdog:
    """One exchange's deadline; `expired` once it has cut the connection."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._done = False

    def arm(self, sock: socket.socket) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self._cut(sock)
            return
        timer = threading.Timer(remaining, self._cut, args=(sock,))
        timer.daemon = True
        with self._lock:
            if self._done:
                return
            self._timers.append(timer)
        timer.start()

    def _cut(self, sock: socket.socket) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def disarm(self) -> None:
        with self._lock:
            self._done = True
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()


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
