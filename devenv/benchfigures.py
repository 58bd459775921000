"""Pure arithmetic of `bench/scale_bench.py`: percentiles, ratios, the API server's request mix.

Kept apart from the benchmark (which needs a control plane) so that it is unit
tested: `tests/unit/test_benchfigures.py`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = [
    "RequestKey",
    "parse_request_counts",
    "percentile",
    "ratio",
    "request_delta",
    "spread",
]

# One sample of the kube-apiserver's `apiserver_request_total` counter in Prometheus's text format.
_REQUEST_TOTAL = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
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


def parse_request_counts(metrics_text: str) -> dict[RequestKey, float]:
    """`apiserver_request_total` summed over code, scope, component, group and version."""
    counts: dict[RequestKey, float] = {}
    for line in metrics_text.splitlines():
        match = _REQUEST_TOTAL.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource = f"{resource}/{labels['subresource']}"
        key = (labels.get("verb", ""), resource)
        counts[key] = counts.get(key, 0.0) + float(match["value"])
    return counts


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
            delta[f"{key[0]} {key[1]}"] = round(grown / per, 3)
    return delta
