"""Kubernetes name syntax and the times Kubernetes writes: one definition each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from m2m_token_operator.api.kube_names import is_dns_label, is_dns_subdomain
from m2m_token_operator.api.timefmt import format_time, parse_time, parse_time_or_none


@pytest.mark.parametrize(
    ("name", "label", "subdomain"),
    [
        ("a", True, True),
        ("team-a", True, True),
        ("0team9", True, True),
        ("a" * 63, True, True),
        ("a" * 64, False, True),
        ("secret.v1", False, True),
        (".".join(["a" * 63] * 4), False, False),  # 255 characters
        (".".join(["a" * 63] * 3 + ["a" * 61]), False, True),  # 253 characters
        ("", False, False),
        ("-a", False, False),
        ("a-", False, False),
        ("Team", False, False),
        ("a_b", False, False),
        ("a..b", False, False),
        ("a.-b", False, False),
        (".a", False, False),
        ("a.", False, False),
    ],
)
def test_dns_names(name: str, label: bool, subdomain: bool) -> None:
    assert is_dns_label(name) is label
    assert is_dns_subdomain(name) is subdomain


def test_times_are_written_in_utc_to_the_second() -> None:
    moment = datetime(2026, 11, 29, 11, 0, 0, 750_000, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(moment) == "2026-11-29T10:00:00Z"


@pytest.mark.parametrize(
    "text", ["2026-11-29T10:00:00Z", "2026-11-29T11:00:00+01:00", "2026-11-29T10:00:00"]
)
def test_times_are_read_in_utc(text: str) -> None:
    expected = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
    assert parse_time(text) == expected
    assert parse_time(text).tzinfo == UTC
    assert parse_time_or_none(text) == expected


@pytest.mark.parametrize("text", [None, "", "yesterday", 1764410400])
def test_text_that_is_not_a_time_reads_as_none(text: object) -> None:
    assert parse_time_or_none(text) is None
