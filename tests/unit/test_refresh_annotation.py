"""The m2m.dev/refresh annotation: when its value is a new request, and what status records."""

from __future__ import annotations

import pytest

from m2m_token_operator.api.refresh_annotation import (
    MAX_RECORDED_LENGTH,
    REFRESH_ANNOTATION,
    pending_request,
    recorded_value,
)


def test_short_printable_values_are_recorded_as_they_are() -> None:
    assert recorded_value("2026-11-29T09:00:00Z") == "2026-11-29T09:00:00Z"
    assert recorded_value("") == ""
    assert recorded_value("x" * MAX_RECORDED_LENGTH) == "x" * MAX_RECORDED_LENGTH


@pytest.mark.parametrize("value", ["x" * (MAX_RECORDED_LENGTH + 1), "x" * 300_000, "a\nb", "\x00"])
def test_long_or_unprintable_values_are_recorded_as_a_digest(value: str) -> None:
    recorded = recorded_value(value)
    assert recorded.startswith("sha256:")
    assert len(recorded) == 71
    assert recorded == recorded_value(value)  # stable: a restart recognises it
    assert recorded != recorded_value(value + "y")


def test_surrogates_do_not_break_the_digest() -> None:
    assert recorded_value("\ud800" * 300).startswith("sha256:")


def test_no_annotation_is_no_request() -> None:
    assert pending_request(None, None) is None
    assert pending_request({}, {"lastRefreshRequest": "v1"}) is None
    assert pending_request({"other": "v"}, {}) is None
    assert pending_request({REFRESH_ANNOTATION: 42}, {}) is None  # not a string: not from the API


def test_a_new_value_is_a_request_until_it_is_recorded() -> None:
    annotations = {REFRESH_ANNOTATION: "2026-11-29T09:00:00Z"}
    assert pending_request(annotations, {}) == "2026-11-29T09:00:00Z"
    assert pending_request(annotations, {"lastRefreshRequest": "older"}) == "2026-11-29T09:00:00Z"
    assert pending_request(annotations, {"lastRefreshRequest": "2026-11-29T09:00:00Z"}) is None


def test_a_long_value_is_handled_once_too() -> None:
    annotations = {REFRESH_ANNOTATION: "y" * 10_000}
    first = pending_request(annotations, {})
    assert first is not None
    assert len(first) <= MAX_RECORDED_LENGTH
    assert pending_request(annotations, {"lastRefreshRequest": first}) is None
