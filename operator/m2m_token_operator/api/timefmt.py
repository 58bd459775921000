"""Times as Kubernetes writes them: RFC 3339 in UTC with a Z, to the second.

Used for the Secret's `expires-at`, the status, Events and `kubectl m2m`. No
imports of ours: the lowest layer.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime


@functools.lru_cache(maxsize=4096)
def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, to the second, as Kubernetes prints times.

    Cached: a look formats the same few instants (its token's issue, refresh and
    expiry times, shared by every TokenRequest of the token) about ten times.
    """
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)  # a naive time is the process's local time, as ever
    # Formatted by hand: strftime was a measurable share of a look (several times each).
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}Z"
    )


def parse_time(text: str) -> datetime:
    """An RFC 3339 time in UTC; one without an offset (say, hand-edited) is taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)  # not the process's local time zone
    return moment.astimezone(UTC)


def parse_time_or_none(text: object) -> datetime | None:
    """`parse_time` for text from others (a status, an Event): None if it is not a time."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None
