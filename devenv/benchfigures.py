"""Pure arithmetic of `bench/scale_bench.py`: percentiles, ratios, the API server's request mix.

Kept apart from the benchmark (which needs a control plane) so that it is unit
tested: `tests/unit/test_benchfigures.py`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "RequestKey",
    "Stack",
    "frame_function",
    "frame_module",
    "parse_collapsed",
    "parse_metric",
    "parse_request_counts",
    "percentile",
    "ratio",
    "request_delta",
    "shares",
    "spread",
    "work_requests",
]

# One sample of a metric in Prometheus's text format: name{labels} value.
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# (verb, resource): "POST", "secrets"; a subresource is appended ("tokenrequests/status").
RequestKey = tuple[str, str]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (`fraction` 0.99 for p99) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def ratio(ours: float | None, floor: float | None) -> float | None:
    """ours / floor to two decimals; None when either is missing or the floor is 0."""
    if ours is None or floor is None or floor == 0:
        return None
    return round(ours / floor, 2)


def spread(values: Sequence[float]) -> str:
    """Several runs' figures as one cell: "5.1, 5.6"."""
    return ", ".join(f"{value:g}" for value in values)


def slowest(
    created: Mapping[str, float], ready: Mapping[str, float], *, started: float, count: int = 10
) -> list[list[float]]:
    """The slowest creates -> Ready, slowest first: [created (s after `started`), took (s)].

    They tell whether the tail is the burst's first creates (a warm-up) or spread over it.
    """
    took = sorted(created, key=lambda uid: ready[uid] - created[uid], reverse=True)[:count]
    return [[round(created[uid] - started, 2), round(ready[uid] - created[uid], 2)] for uid in took]


def parse_metric(metrics_text: str, name: str) -> dict[RequestKey, float]:
    """One metric of the kube-apiserver, summed per (verb, resource[/subresource]).

    Other labels (code, scope, component, group, version) are summed over; a metric
    without a verb label (the watch events) has verb "".
    """
    counts: dict[RequestKey, float] = {}
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != name:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource = f"{resource}/{labels['subresource']}"
        key = (labels.get("verb", ""), resource)
        counts[key] = counts.get(key, 0.0) + float(match["value"])
    return counts


def parse_request_counts(metrics_text: str) -> dict[RequestKey, float]:
    """`apiserver_request_total` summed over code, scope, component, group and version."""
    return parse_metric(metrics_text, "apiserver_request_total")


def work_requests(before: Mapping[RequestKey, float], after: Mapping[RequestKey, float]) -> float:
    """Requests between two scrapes that are work on objects: not the control plane's
    heartbeats (leases), not non-resource paths (/metrics, /healthz, discovery), not
    watches (counted when they end, at a time of the API server's choosing)."""
    return sum(
        after[key] - before.get(key, 0.0)
        for key in after
        if key[0] != "WATCH" and key[1] and not key[1].startswith(("leases", "/"))
    )


def request_delta(
    before: Mapping[RequestKey, float], after: Mapping[RequestKey, float], per: int = 1
) -> dict[str, float]:
    """Requests counted between two scrapes, divided by `per`, as {"POST secrets": 1.0}.

    Only keys that grew, rounded to three decimals, sorted by key.
    """
    delta: dict[str, float] = {}
    for key in sorted(after):
        grown = after[key] - before.get(key, 0.0)
        if grown > 0:
            delta[f"{key[0]} {key[1]}".strip()] = round(grown / per, 3)
    return delta


# --- py-spy's raw output (collapsed stacks) ------------------------------------------

# One frame of py-spy's raw format: "function (path/to/file.py:123)".
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


@dataclass(frozen=True)
class Stack:
    """One line of `py-spy record --format raw --threads`: a thread, its frames, the samples."""

    thread: str
    frames: tuple[str, ...]  # outermost first, each "function (file:line)"
    samples: int


def parse_collapsed(text: str) -> list[Stack]:
    """Lines "thread (123): Name;frame;frame 42"; a line without --threads has thread ""."""
    stacks = []
    for line in text.splitlines():
        body, _, count = line.rstrip().rpartition(" ")
        if not body or not count.isdigit():
            continue
        parts = body.split(";")
        thread = ""
        if parts[0].startswith("thread ("):
            thread = parts[0].split(": ", 1)[-1]
            parts = parts[1:]
        if not parts:
            continue
        stacks.append(Stack(thread=thread, frames=tuple(parts), samples=int(count)))
    return stacks


def frame_module(frame: str) -> str:
    """The top-level package or module a frame's file belongs to ("kopf", "json", ...)."""
    match = _FRAME.match(frame)
    path = match["file"] if match else frame
    parts = [part for part in path.split("/") if part]
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    else:
        for marker in ("python3.11", "python3.12", "python3.13", "operator"):
            if marker in parts:
                parts = parts[parts.index(marker) + 1 :]
                break
    if not parts:
        return path
    return parts[0].removesuffix(".py")


def frame_function(frame: str) -> str:
    """The dotted module and function of a frame, e.g. "json.encoder.iterencode"."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    parts = [part for part in path.split("/") if part]
    for marker in ("site-packages", "python3.11", "python3.12", "python3.13", "operator"):
        if marker in parts:
            parts = parts[parts.index(marker) + 1 :]
            break
    dotted = ".".join(parts).removesuffix(".py")
    return f"{dotted}.{match['function']}" if dotted else match["function"]


def shares(stacks: Sequence[Stack], key: Callable[[Stack], Iterable[str]]) -> dict[str, float]:
    """Per label, the share (%) of all samples whose stack `key` labels with it (once each)."""
    total = sum(stack.samples for stack in stacks)
    counts: dict[str, int] = {}
    for stack in stacks:
        for label in set(key(stack)):
            counts[label] = counts.get(label, 0) + stack.samples
    if not total:
        return {}
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {label: round(100 * count / total, 1) for label, count in ordered}


# Connections the kernel refused or delayed: a dropped SYN is resent after 1 s, a latency
# of whole seconds that neither operator's code explains.
TCP_COUNTERS = ("ListenOverflows", "TCPSynRetrans", "TCPTimeouts")


def parse_tcp_counters(netstat: str) -> dict[str, int]:
    """The TCP_COUNTERS of /proc/net/netstat's TcpExt table (names line, then values)."""
    lines = netstat.splitlines()
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return {name: int(table[name]) for name in TCP_COUNTERS if name in table}
    return {}
