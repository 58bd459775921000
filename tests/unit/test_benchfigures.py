"""The scale benchmark's arithmetic: percentiles, ratios to the floor, the request mix."""

from __future__ import annotations

import pytest

from devenv.benchfigures import (
    frame_function,
    frame_module,
    parse_collapsed,
    parse_metric,
    parse_request_counts,
    parse_tcp_counters,
    percentile,
    ratio,
    request_delta,
    shares,
    slowest,
    spread,
    work_requests,
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
        'apiserver_watch_events_total{group="",resource="secrets",version="v1"} 40',
        'apiserver_watch_events_total{group="m2m.dev",resource="tokenrequests",version="v1"} 9',
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


def test_slowest_lists_the_longest_waits_first_with_when_they_were_created() -> None:
    created = {"a": 10.0, "b": 10.5, "c": 11.0}
    ready = {"a": 10.2, "b": 12.0, "c": 11.1}
    assert slowest(created, ready, started=10.0, count=2) == [[0.5, 1.5], [0.0, 0.2]]


def test_parse_metric_without_a_verb() -> None:
    assert parse_metric(METRICS, "apiserver_watch_events_total") == {
        ("", "secrets"): 40.0,
        ("", "tokenrequests"): 9.0,
    }
    assert request_delta({}, parse_metric(METRICS, "apiserver_watch_events_total"), per=4) == {
        "secrets": 10.0,
        "tokenrequests": 2.25,
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


SITE = "/w/.venv/lib/python3.11/site-packages"
PROFILE = f"""\
py-spy> a line that is no stack
thread (11): MainThread;_run (/usr/lib/python3.11/asyncio/events.py:80);process ({SITE}/kopf/_core/reactor/processing.py:5);dumps (/usr/lib/python3.11/json/__init__.py:231) 6
thread (12): ThreadPoolExecutor-0_0;_worker (/usr/lib/python3.11/concurrent/futures/thread.py:83);patch (/w/operator/m2m_token_operator/kube.py:300);urlopen ({SITE}/urllib3/connectionpool.py:700) 3
thread (11): MainThread;_run (/usr/lib/python3.11/asyncio/events.py:80);process ({SITE}/kopf/_core/reactor/processing.py:5) 1
thread (13): Idle 7
"""  # noqa: E501


def test_parse_collapsed_stacks() -> None:
    stacks = parse_collapsed(PROFILE)
    assert [(s.thread, len(s.frames), s.samples) for s in stacks] == [
        ("MainThread", 3, 6),
        ("ThreadPoolExecutor-0_0", 3, 3),
        ("MainThread", 2, 1),
    ]


def test_frame_module_and_function() -> None:
    assert frame_module("dumps (/usr/lib/python3.11/json/__init__.py:231)") == "json"
    assert frame_module(f"process ({SITE}/kopf/_core/reactor/processing.py:5)") == "kopf"
    assert frame_module("patch (/w/operator/m2m_token_operator/kube.py:300)") == (
        "m2m_token_operator"
    )
    assert frame_function("patch (/w/operator/m2m_token_operator/kube.py:300)") == (
        "m2m_token_operator.kube.patch"
    )
    assert frame_function(f"urlopen ({SITE}/urllib3/connectionpool.py:700)") == (
        "urllib3.connectionpool.urlopen"
    )


def test_shares_count_each_stack_once_per_label() -> None:
    stacks = parse_collapsed(PROFILE)
    assert shares(stacks, lambda s: [frame_module(s.frames[-1])]) == {
        "json": 60.0,
        "urllib3": 30.0,
        "kopf": 10.0,
    }
    # kopf and asyncio are each on two stacks, of 6 and 1 samples: 7 of 10.
    inclusive = shares(stacks, lambda s: map(frame_module, s.frames))
    assert inclusive["kopf"] == 70.0
    assert inclusive["asyncio"] == 70.0
    assert shares([], lambda s: [s.thread]) == {}


def test_work_requests_leave_out_heartbeats_paths_and_watches() -> None:
    before = {("GET", "secrets"): 5.0, ("PUT", "leases"): 1.0}
    after = {
        ("GET", "secrets"): 8.0,
        ("PUT", "leases"): 9.0,
        ("GET", "/metrics"): 4.0,
        ("WATCH", "secrets"): 2.0,
        ("DELETE", "tokenrequests"): 1.0,
    }
    assert work_requests(before, after) == 4.0


def test_the_tcp_counters_are_read_from_the_tcpext_table_and_not_the_ipext_one() -> None:
    netstat = (
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPTimeouts TCPSynRetrans\n"
        "TcpExt: 0 14500 14500 10229 9044\n"
        "IpExt: InNoRoutes ListenOverflows\n"
        "IpExt: 0 7\n"
    )
    assert parse_tcp_counters(netstat) == {
        "ListenOverflows": 14500,
        "TCPSynRetrans": 9044,
        "TCPTimeouts": 10229,
    }


def test_no_tcpext_table_gives_no_counters_rather_than_zeros() -> None:
    assert parse_tcp_counters("IpExt: InNoRoutes\nIpExt: 0\n") == {}
