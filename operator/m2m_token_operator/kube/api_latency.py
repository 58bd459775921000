"""How long the operator's own Kubernetes API calls take: one histogram, by verb and kind.

Here, beside the calls it times (`kube_api.py`), because the API layer may not import the
reconcile layer's `metrics.py`; that module names this series with the others.
"""

from __future__ import annotations

from prometheus_client import Histogram

API_LATENCY = Histogram(
    "m2m_kube_api_request_duration_seconds",
    "Time of the operator's own Kubernetes API calls (not Kopf's watches), by call.",
    ["call"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


# The histogram of each call label ("create Secret"): found by dict, not by `labels()`
# each time (which validates and locks), as every API call observes one.
_BY_CALL: dict[str, Histogram] = {}


def observe_api_call(action: str, seconds: float) -> None:
    """`action` is the call's description ("read Secret ns/name"): its verb and kind label it."""
    call = " ".join(action.split(maxsplit=2)[:2])
    histogram = _BY_CALL.get(call)
    if histogram is None:
        histogram = _BY_CALL.setdefault(call, API_LATENCY.labels(call=call))
    histogram.observe(seconds)
