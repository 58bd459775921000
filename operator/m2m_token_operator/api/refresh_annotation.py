"""Force a refresh: the `m2m.dev/refresh` annotation, and when its value is a new request.

A user (or `kubectl m2m refresh`) sets or changes the annotation on a
TokenRequest; any value will do, a timestamp is customary. The operator then
fetches a new token at once and records the value it handled in
`status.lastRefreshRequest`, so that the same value is never handled twice, not
even by an operator restarted after it: the annotation is the desired state and
the status what was done, and a request is pending exactly while they differ.

An annotation value may be up to 256 KiB (the API server's limit for all of
them together) and hold anything; the status keeps at most
`MAX_RECORDED_LENGTH` characters: a longer value is recorded as
`sha256:<hex digest>`, which still tells one value from another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

REFRESH_ANNOTATION = "m2m.dev/refresh"
# Room for any timestamp or a Kubernetes object name; the digest form is 71 characters.
MAX_RECORDED_LENGTH = 253
_DIGEST_PREFIX = "sha256:"


def recorded_value(value: str) -> str:
    """What status.lastRefreshRequest records for the annotation value `value`."""
    if len(value) <= MAX_RECORDED_LENGTH and value.isprintable():
        return value
    # Too long, or with control characters that would garble `kubectl get -o yaml`.
    return _DIGEST_PREFIX + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def pending_request(
    annotations: Mapping[str, Any] | None, status: Mapping[str, Any] | None
) -> str | None:
    """The value to record if the annotation asks for a refresh not handled yet, else None.

    No annotation: nothing asked. The same value as handled before: nothing new
    (an empty value is a value like any other).
    """
    value = (annotations or {}).get(REFRESH_ANNOTATION)
    if not isinstance(value, str):
        return None
    recorded = recorded_value(value)
    if recorded == (status or {}).get("lastRefreshRequest"):
        return None
    return recorded
