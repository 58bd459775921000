"""A list + watch of one kind of object, filtered by the API server, not by us.

Kopf filters `labels=` and `when=` on the client: the API server still sends
every object of the watched kind, and Kopf keeps them all. For Secrets that
means holding the whole cluster's Secrets, whatever their owner. This watch
passes the label selector to the API server, so only matching objects ever
reach the process, and it keeps nothing of them but their resource versions.

It behaves like a client-go reflector, in miniature:

- the initial list is paged (`limit` / `continue`);
- the watch resumes from the last resource version seen (bookmarks included)
  after a normal end or a dropped connection;
- `410 Gone` (the resource version is too old) leads to a fresh list, and
  objects that went away meanwhile are reported as `DELETED`;
- an object modified so that it stops matching the selector arrives as
  `DELETED` (the API server does that for selector watches);
- failures are retried with capped exponential backoff, never in a tight loop;
- with `metadata_only`, the API server sends each object as `PartialObjectMetadata`
  (its metadata, never `data` or `spec`): an object that matches the selector but
  is not ours costs its metadata, however large its content.

The blocking client runs on a thread of its own, never on the event loop and
never in the pool that the operator's reads and writes share, so a busy API
pool cannot delay events and a slow watch cannot delay writes. Events are
handed to `on_event` on the event loop, one at a time, in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import urllib3.exceptions

from m2m_token_operator.api.constants import JsonObject
from m2m_token_operator.kube import wire_json

logger = logging.getLogger(__name__)

ObjectKey = tuple[str, str]  # (namespace or "", name)
EventHandler = Callable[[str, JsonObject], None]

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"

# The API server ends a watch after this long; we then resume from the last version.
WATCH_SECONDS = 240
# (connect, read) timeouts; the read timeout exceeds the server's bookmark interval
# (about a minute) with room to spare, so a silent connection is a dead one.
LIST_TIMEOUT = (10.0, 60.0)
WATCH_TIMEOUT = (10.0, 120.0)
RETRY_INITIAL = 1.0
RETRY_MAXIMUM = 30.0
# Content negotiation for metadata-only lists and watches (what client-go's metadata
# informers send): the server strips everything but `metadata` before it serialises.
METADATA_LIST_ACCEPT = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA_WATCH_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Run `callback` on the loop; nothing when the loop has closed (the operator stops)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


class _Gone(Exception):
    """The resource version is too old: list again."""


def _key(obj: JsonObject) -> ObjectKey:
    metadata = obj.get("metadata") or {}
    return (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))


def _lines(response: Any) -> Iterator[bytes]:
    """Newline-delimited JSON from a streamed response, however the chunks fall."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=True):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


class LabelSelectedWatch:
    """List + watch with a server-side label selector; see the module docstring."""

    def __init__(
        self,
        *,
        name: str,
        lister: Callable[..., Any],
        label_selector: str,
        on_event: EventHandler,
        page_size: int = 500,
        random_fraction: Callable[[], float] = random.random,
        retry_initial: float = RETRY_INITIAL,
        metadata_only: bool = False,
        on_forbidden: Callable[[bool], None] | None = None,
    ) -> None:
        self.name = name
        # Told (on the event loop) when the API server refuses the list or watch with 403,
        # and again when a list succeeds after that: a missing permission is no silence.
        self._on_forbidden = on_forbidden
        self.forbidden = False
        self._lister = lister
        self._selector = label_selector
        self._on_event = on_event
        self._page_size = page_size
        self._random = random_fraction
        self._retry_initial = retry_initial
        self.metadata_only = metadata_only
        self.synced = asyncio.Event()
        # Only what is needed to tell changed and vanished objects apart after a re-list.
        self._known: dict[ObjectKey, str] = {}
        self._stop = threading.Event()
        self._response: Any = None
        self.lists = 0  # complete lists done (1 + re-lists after 410 or errors)
        # Events from the watch's thread, waiting for the loop (see `_deliver`). A drain
        # queued before `synced.set` takes every event of the list with it.
        self._inbox: collections.deque[tuple[str, JsonObject]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._drain_pending = False
        self.wakeups = 0  # drains run on the loop (fewer than events under a burst)

    async def run(self) -> None:
        """List, then watch, until cancelled."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        self._stop.clear()

        def finish() -> None:
            if not finished.done():
                finished.set_result(None)

        def main() -> None:
            try:
                self._loop_forever(loop)
            finally:
                _post(loop, finish)

        thread = threading.Thread(target=main, name=f"watch-{self.name}", daemon=True)
        thread.start()
        try:
            await finished
        finally:
            self._stop.set()
            response = self._response
            if response is not None:
                # Unblocks the thread's read; it then sees the stop flag and ends. Not
                # close(): that waits for the lock the blocked read holds, on the event loop.
                with contextlib.suppress(Exception):
                    response.shutdown()

    # Everything below runs on the watch's own thread.

    def _loop_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list(loop)
                    failures = 0
                version = self._watch(loop, version)
                failures = 0
            except _Gone:
                logger.info("Watch %s: resource version too old, listing again", self.name)
                version = None
            except (
                kubernetes.client.ApiException,
                urllib3.exceptions.HTTPError,
                OSError,
                ValueError,
            ) as error:
                if self._stop.is_set():
                    return
                if isinstance(error, kubernetes.client.ApiException) and error.status == 410:
                    version = None
                    continue
                if isinstance(error, kubernetes.client.ApiException) and error.status == 403:
                    self._set_forbidden(loop, True)
                failures += 1
                delay = min(RETRY_MAXIMUM, self._retry_initial * 2 ** min(failures - 1, 10))
                delay *= 0.5 + self._random() / 2
                status = getattr(error, "status", None)
                logger.warning(
                    "Watch %s failed (%s%s); retrying in %.1f s",
                    self.name,
                    type(error).__name__,
                    f" HTTP {status}" if status else "",
                    delay,
                )
                if self._stop.wait(delay):
                    return
                if failures >= 3:
                    version = None  # the watch keeps failing: start over from a list
            except Exception:
                if self._stop.is_set():
                    return  # closing the response under a read raises whatever it raises
                logger.exception("Watch %s: unexpected failure; listing again", self.name)
                version = None
                if self._stop.wait(RETRY_MAXIMUM):
                    return

    def _set_forbidden(self, loop: asyncio.AbstractEventLoop, forbidden: bool) -> None:
        if forbidden == self.forbidden:
            return
        self.forbidden = forbidden
        on_forbidden = self._on_forbidden
        if on_forbidden is not None:
            _post(loop, lambda: on_forbidden(forbidden))

    def _deliver(
        self, loop: asyncio.AbstractEventLoop, events: list[tuple[str, JsonObject]]
    ) -> None:
        """Queue events for the loop; wake it only if no wake-up is pending already.

        Under a burst the loop is busy and events arrive faster than it drains them:
        one wake-up (a write to the loop's self-pipe, a callback, the GIL handed
        over) then serves every event queued meanwhile, in order, instead of one each.
        """
        if not events:
            return
        with self._inbox_lock:
            self._inbox.extend(events)
            if self._drain_pending:
                return
            self._drain_pending = True
        _post(loop, self._drain)

    def _drain(self) -> None:
        """On the loop: dispatch everything queued so far, oldest first."""
        with self._inbox_lock:
            events = list(self._inbox)
            self._inbox.clear()
            self._drain_pending = False
        self.wakeups += 1
        self._dispatch(events)

    def _dispatch(self, events: list[tuple[str, JsonObject]]) -> None:
        if self._stop.is_set():
            return  # stopped: nobody listens any more
        for kind, obj in events:
            try:
                self._on_event(kind, obj)
            except Exception:
                # One bad event must not end the watch for every other object.
                logger.exception("Watch %s: handling a %s event failed", self.name, kind)

    def _list(self, loop: asyncio.AbstractEventLoop) -> str:
        """A complete, paged list; reports what changed since the last one. Its version."""
        seen: dict[ObjectKey, str] = {}
        token: str | None = None
        version = ""
        while True:
            arguments: dict[str, Any] = {
                "label_selector": self._selector,
                "limit": self._page_size,
                "_preload_content": False,
                "_request_timeout": LIST_TIMEOUT,
            }
            if token:
                arguments["_continue"] = token
            if self.metadata_only:
                arguments["_headers"] = {"Accept": METADATA_LIST_ACCEPT}
            try:
                response = self._lister(**arguments)
            except kubernetes.client.ApiException as error:
                if error.status == 410 and token:
                    # The continue token expired mid-list: the list starts over.
                    seen.clear()
                    token = None
                    continue
                raise
            page: JsonObject = wire_json.loads(response.data)
            events: list[tuple[str, JsonObject]] = []
            for item in page.get("items") or []:
                key = _key(item)
                item_version = str((item.get("metadata") or {}).get("resourceVersion") or "")
                seen[key] = item_version
                previous = self._known.get(key)
                if previous is None:
                    events.append((ADDED, item))
                elif previous != item_version:
                    events.append((MODIFIED, item))
                self._known[key] = item_version
            self._deliver(loop, events)
            metadata = page.get("metadata") or {}
            version = str(metadata.get("resourceVersion") or version)
            token = metadata.get("continue") or None
            if not token:
                break
        vanished = [key for key in self._known if key not in seen]
        for key in vanished:
            del self._known[key]
        self._deliver(loop, [(DELETED, self._tombstone(key)) for key in vanished])
        self.lists += 1
        _post(loop, self.synced.set)
        self._set_forbidden(loop, False)
        return version

    @staticmethod
    def _tombstone(key: ObjectKey) -> JsonObject:
        namespace, name = key
        metadata: JsonObject = {"name": name}
        if namespace:
            metadata["namespace"] = namespace
        return {"metadata": metadata}

    def _watch(self, loop: asyncio.AbstractEventLoop, version: str) -> str:
        """One watch request from `version`; the last version seen when it ends normally."""
        arguments: dict[str, Any] = {
            "label_selector": self._selector,
            "watch": True,
            "resource_version": version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": WATCH_SECONDS,
            "_preload_content": False,
            "_request_timeout": WATCH_TIMEOUT,
        }
        if self.metadata_only:
            arguments["_headers"] = {"Accept": METADATA_WATCH_ACCEPT}
        response = self._lister(**arguments)
        self._response = response
        try:
            for line in _lines(response):
                if self._stop.is_set():
                    break
                event: JsonObject = wire_json.loads(line)
                kind = str(event.get("type") or "")
                obj: JsonObject = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone
                    raise ValueError(f"watch error {obj.get('code')} {obj.get('reason')}")
                new_version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                if new_version:
                    version = new_version
                if kind == "BOOKMARK":
                    continue
                key = _key(obj)
                if kind == DELETED:
                    self._known.pop(key, None)
                elif kind in (ADDED, MODIFIED):
                    self._known[key] = new_version
                else:
                    continue
                self._deliver(loop, [(kind, obj)])
        except urllib3.exceptions.ReadTimeoutError:
            # Silent for longer than bookmarks allow: resume from the last version.
            pass
        finally:
            self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()
        return version
