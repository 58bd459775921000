"""The scale benchmark's arithmetic: percentiles, ratios to the floor, the request mix."""

from __future__ import annotations

import pytest

from devenv.benchfigures import (
    parse_request_counts,
    percentile,
    ratio,
    request_delta,
    spread,
)


def _sample(group: str, resource: str, subresource: str, verb: str, code: str, value: str) -> str:
    labels = (
        f'code="{code}",component="apiserver",dry_run="",group="{group}",resource="{resource}",'
        f'scope="resource",subresource="{subresource}",verb="{verb}",version="v1"'
    )
    return f"apiserver_request_total{{{labels}}} {value}"


METRICS = "\n".join(
    [
        "# HELP apiserver_request_total [STABLE] Counter of apiserver requests.",
        "# TYPE apiserver_request_total counter",
        _sample("", "secrets", "", "POST", "201", "10"),
        _sample("", "secrets", "", "POST", "409", "2"),
        _sample("m2m.dev", "tokenrequests", "status", "PATCH", "200", "7"),
        _sample("", "events", "", "LIST", "200", "1.5e+01"),
        'apiserver_request_duration_seconds_count{resource="secrets",verb="POST"} 99',
    ]
)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([5.0, 1.0, 3.0], 0.0) == 1.0


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_ratio_to_the_floor() -> None:
    assert ratio(10.4, 6.2) == 1.68
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(2.0, None) is None


def test_spread_lists_runs() -> None:
    assert spread([5.1, 5.6]) == "5.1, 5.6"
    assert spread([]) == ""


def test_parse_sums_codes_and_names_subresources() -> None:
    counts = parse_request_counts(METRICS)
    assert counts == {
        ("POST", "secrets"): 12.0,
        ("PATCH", "tokenrequests/status"): 7.0,
        ("LIST", "events"): 15.0,
    }


def test_request_delta_per_token_request() -> None:
    before = {("POST", "secrets"): 10.0, ("LIST", "events"): 3.0}
    after = {
        ("POST", "secrets"): 30.0,
        ("LIST", "events"): 3.0,
        ("PATCH", "tokenrequests/status"): 40.0,
    }
    assert request_delta(before, after, per=20) == {
        "PATCH tokenrequests/status": 2.0,
        "POST secrets": 1.0,
    }
