"""LabelSelectedWatch against a scripted lister: paging, resuming, 410, vanished objects.

The lister is the watch's boundary (a kubernetes client list function); a scripted
one lets each reflector rule be shown exactly. The real API server's behaviour is
covered in tests/e2e/test_watch.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from m2m_token_operator.kube.reflector import ADDED, DELETED, MODIFIED, LabelSelectedWatch

JsonObject = dict[str, Any]


def _obj(name: str, version: str, namespace: str = "ns") -> JsonObject:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": version}}


class _Response:
    def __init__(self, *, data: JsonObject | None = None, lines: list[JsonObject] | None = None):
        self.data = json.dumps(data or {}).encode()
        self._lines = lines or []
        self.closed = threading.Event()

    def stream(self, amt: Any = None, decode_content: bool = True) -> Iterator[bytes]:
        for line in self._lines:
            # Split each line across two chunks: the reader must join them.
            raw = (json.dumps(line) + "\n").encode()
            yield raw[:5]
            yield raw[5:]
        # Then hang like an idle watch until closed.
        self.closed.wait(5)

    def close(self) -> None:
        self.closed.set()

    def release_conn(self) -> None:
        pass


class _Lister:
    """Answers list and watch calls from a script; records every call's arguments."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **arguments: Any) -> Any:
        self.calls.append(arguments)
        if not self.script:
            return _Response(lines=[])  # idle watch
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def _run_until(watch: LabelSelectedWatch, events: list[tuple[str, str]], count: int) -> None:
    task = asyncio.create_task(watch.run())
    try:
        for _ in range(500):
            if len(events) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {events} arrived")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _watch(lister: _Lister, events: list[tuple[str, str]]) -> LabelSelectedWatch:
    return LabelSelectedWatch(
        name="test",
        lister=lister,
        label_selector="app=ours",
        on_event=lambda kind, obj: events.append((kind, obj["metadata"]["name"])),
        page_size=2,
        random_fraction=lambda: 0.0,
    )


async def test_pages_the_initial_list_then_watches_from_its_version() -> None:
    lister = _Lister(
        [
            _Response(data={"metadata": {"continue": "next"}, "items": [_obj("a", "1")]}),
            _Response(data={"metadata": {"resourceVersion": "7"}, "items": [_obj("b", "2")]}),
            _Response(lines=[{"type": "MODIFIED", "object": _obj("a", "8")}]),
        ]
    )
    events: list[tuple[str, str]] = []
    watch = _watch(lister, events)
    await _run_until(watch, events, 3)
    assert events == [(ADDED, "a"), (ADDED, "b"), (MODIFIED, "a")]
    assert watch.synced.is_set()
    assert all(call["label_selector"] == "app=ours" for call in lister.calls)
    assert lister.calls[0]["limit"] == 2
    assert lister.calls[1]["_continue"] == "next"
    assert lister.calls[2]["watch"] is True
    assert lister.calls[2]["resource_version"] == "7"


async def test_gone_lists_again_and_reports_vanished_objects_deleted() -> None:
    lister = _Lister(
        [
            _Response(
                data={
                    "metadata": {"resourceVersion": "5"},
                    "items": [_obj("a", "1"), _obj("b", "2")],
                }
            ),
            _Response(lines=[{"type": "ERROR", "object": {"code": 410, "reason": "Expired"}}]),
            # b vanished, a changed, c appeared while we were not watching.
            _Response(
                data={
                    "metadata": {"resourceVersion": "9"},
                    "items": [_obj("a", "3"), _obj("c", "4")],
                }
            ),
        ]
    )
    events: list[tuple[str, str]] = []
    watch = _watch(lister, events)
    await _run_until(watch, events, 5)
    assert events[:2] == [(ADDED, "a"), (ADDED, "b")]
    assert sorted(events[2:]) == [(ADDED, "c"), (DELETED, "b"), (MODIFIED, "a")]
    assert watch.lists == 2


async def test_bookmarks_move_the_version_without_an_event() -> None:
    lister = _Lister(
        [
            _Response(data={"metadata": {"resourceVersion": "1"}, "items": []}),
            _Response(
                lines=[
                    {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "40"}}},
                    {"type": "ADDED", "object": _obj("x", "41")},
                ]
            ),
        ]
    )
    events: list[tuple[str, str]] = []
    watch = _watch(lister, events)
    await _run_until(watch, events, 1)
    assert events == [(ADDED, "x")]


async def test_an_api_error_is_retried_and_one_bad_handler_does_not_end_the_watch() -> None:
    lister = _Lister(
        [
            kubernetes.client.ApiException(status=503, reason="Service Unavailable"),
            _Response(
                data={
                    "metadata": {"resourceVersion": "1"},
                    "items": [_obj("boom", "1"), _obj("ok", "2")],
                }
            ),
        ]
    )
    seen: list[tuple[str, str]] = []

    def handler(kind: str, obj: JsonObject) -> None:
        if obj["metadata"]["name"] == "boom":
            raise RuntimeError("handler bug")
        seen.append((kind, obj["metadata"]["name"]))

    watch = LabelSelectedWatch(
        name="test", lister=lister, label_selector="a=b", on_event=handler,
        random_fraction=lambda: 0.0, retry_initial=0.001,
    )  # fmt: skip
    await _run_until(watch, seen, 1)
    assert seen == [(ADDED, "ok")]


async def test_a_metadata_only_watch_asks_for_metadata_on_the_list_and_the_watch() -> None:
    lister = _Lister(
        [
            _Response(data={"metadata": {"resourceVersion": "3"}, "items": [_obj("a", "1")]}),
            _Response(lines=[{"type": "MODIFIED", "object": _obj("a", "4")}]),
        ]
    )
    events: list[tuple[str, str]] = []
    watch = LabelSelectedWatch(
        name="test",
        lister=lister,
        label_selector="app=ours",
        on_event=lambda kind, obj: events.append((kind, obj["metadata"]["name"])),
        metadata_only=True,
    )
    await _run_until(watch, events, 2)
    assert events == [(ADDED, "a"), (MODIFIED, "a")]
    list_call, watch_call = lister.calls[0], lister.calls[1]
    # What client-go's metadata informers send: the API server strips data before sending.
    assert list_call["_headers"] == {
        "Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
    }
    assert watch_call["watch"] is True
    assert watch_call["_headers"] == {
        "Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
    }


async def test_a_full_watch_sends_no_accept_header_of_its_own() -> None:
    lister = _Lister(
        [_Response(data={"metadata": {"resourceVersion": "3"}, "items": [_obj("a", "1")]})]
    )
    events: list[tuple[str, str]] = []
    await _run_until(_watch(lister, events), events, 1)
    assert all("_headers" not in call for call in lister.calls)


class _SentSignallingResponse(_Response):
    """Sets `all_sent` once the watch's thread has taken (and queued) every line."""

    def __init__(self, *, lines: list[JsonObject]) -> None:
        super().__init__(lines=lines)
        self.all_sent = threading.Event()

    def stream(self, amt: Any = None, decode_content: bool = True) -> Iterator[bytes]:
        # The thread asks for the next chunk only after it queued the events of the last.
        yield b"".join((json.dumps(line) + "\n").encode() for line in self._lines)
        self.all_sent.set()
        self.closed.wait(5)


async def test_events_queued_while_the_loop_is_busy_are_drained_in_order_by_one_wake_up() -> None:
    count = 50
    response = _SentSignallingResponse(
        lines=[{"type": "ADDED", "object": _obj(f"tr-{i:02d}", str(10 + i))} for i in range(count)]
    )
    lister = _Lister(
        [_Response(data={"metadata": {"resourceVersion": "1"}, "items": []}), response]
    )
    events: list[tuple[str, str]] = []

    def busy_on_the_first(kind: str, obj: JsonObject) -> None:
        if not events:
            # The loop is busy (a burst) until the thread has queued every event.
            assert response.all_sent.wait(5)
        events.append((kind, obj["metadata"]["name"]))

    watch = LabelSelectedWatch(
        name="test",
        lister=lister,
        label_selector="app=ours",
        on_event=busy_on_the_first,
        random_fraction=lambda: 0.0,
    )
    await _run_until(watch, events, count)
    assert events == [(ADDED, f"tr-{i:02d}") for i in range(count)]
    # The first wake-up, and at most one more for everything queued while it ran.
    assert watch.wakeups <= 2
