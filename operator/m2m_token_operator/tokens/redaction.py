"""A last line of defence: no client secret or token leaves the process in a log line.

The code never logs a secret on purpose. This guards against the accidents:
a library logging a request body, an exception message echoing a form field,
a debug line somebody adds next year. Every log record is scrubbed when it is
created, of every secret value the operator has handled and of anything
shaped like a JSON Web Token, before any handler or formatter sees it.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import OrderedDict, deque
from typing import Any

REDACTED = "[REDACTED]"
# Three base64url segments, the first one a JSON object ("eyJ" is `{"` encoded).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
# Values nothing holds any more (and those registered without a holder: one-use client
# assertions, minted ServiceAccount tokens) stay this many registrations longer, the
# newest first. Held values are not counted: they stay as long as they are held.
_RECENT_VALUES = 4096
_MIN_LENGTH = 6  # shorter strings would scrub ordinary words


class Redactor:
    """The secret values handled so far, found in a text in time linear in the text.

    Looking for each value in turn made every log line cost as much as the number
    of tokens held (thousands at scale); here the values are indexed by their first
    `_MIN_LENGTH` characters, so a line is scanned once, whatever their number.

    A value registered with a `holder` (the token or credentials object that carries
    it) is kept for as long as any of its holders is alive, however many there are:
    at 10,000 TokenRequests no live token or client secret can age out, as they did
    from the fixed 4,096 of before. Once released it joins the recent values, which
    keep the last `recent` of their kind.
    """

    def __init__(self, recent: int = _RECENT_VALUES) -> None:
        self._recent_limit = recent
        self._recent: OrderedDict[str, None] = OrderedDict()
        # value -> id() of each live holder (one finalizer per holder and value, however
        # often the same token is registered: each look at each of its TokenRequests does).
        self._held: dict[str, set[int]] = {}
        self._by_prefix: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        # Filled by finalizers, which may run in any thread at any bytecode (the garbage
        # collector), also inside a locked section: so they only append here, and the
        # next register or scrub takes them under the lock.
        self._released: deque[tuple[str, int]] = deque()

    def register(self, value: str, *, holder: object | None = None) -> None:
        """Scrub `value` from now on: while `holder` lives, else while it is recent."""
        if len(value) < _MIN_LENGTH:
            return
        with self._lock:
            # First: a holder that died and whose id() a new one reuses is released.
            self._take_releases()
            if holder is not None:
                holders = self._held.setdefault(value, set())
                if id(holder) not in holders:
                    holders.add(id(holder))
                    weakref.finalize(holder, self._released.append, (value, id(holder)))
                self._recent.pop(value, None)
            elif value not in self._held:
                self._recent[value] = None
                self._recent.move_to_end(value)
            self._by_prefix.setdefault(value[:_MIN_LENGTH], set()).add(value)
            self._trim()

    def _take_releases(self) -> None:
        while self._released:
            value, holder_id = self._released.popleft()
            holders = self._held.get(value)
            if holders is None:
                continue
            holders.discard(holder_id)
            if not holders:
                del self._held[value]
                self._recent[value] = None  # kept a while longer, as an unheld value
        self._trim()

    def _trim(self) -> None:
        while len(self._recent) > self._recent_limit:
            oldest, _ = self._recent.popitem(last=False)
            bucket = self._by_prefix[oldest[:_MIN_LENGTH]]
            bucket.discard(oldest)
            if not bucket:
                del self._by_prefix[oldest[:_MIN_LENGTH]]

    def scrub(self, text: str) -> str:
        text = _JWT.sub(REDACTED, text)
        found: set[str] = set()
        with self._lock:
            self._take_releases()
            lookup = self._by_prefix.get
            for start in range(len(text) - _MIN_LENGTH + 1):
                bucket = lookup(text[start : start + _MIN_LENGTH])
                if bucket:
                    found.update(bucket)
        # Longest first: a value that contains another is replaced whole.
        for value in sorted(found, key=len, reverse=True):
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def __len__(self) -> int:
        with self._lock:
            self._take_releases()
            return len(self._held) + len(self._recent)

    @property
    def held(self) -> int:
        """How many distinct values some live holder carries."""
        with self._lock:
            self._take_releases()
            return len(self._held)


REDACTOR = Redactor()
_installed = False


def _scrub_exception_and_stack(record: logging.LogRecord) -> None:
    """Replace the live exception by its scrubbed traceback text, and scrub the stack.

    Formatters re-render `exc_info` as they please: `logging.Formatter` reuses a
    cached `exc_text`, but python-json-logger (Kopf's `--log-format=json`)
    formats `exc_info` afresh and would print the secret in an exception message.
    Both print `exc_text` when `exc_info` is empty, so the traceback is rendered
    once here, scrubbed, kept as `exc_text`, and the exception itself dropped.
    """
    if record.exc_info:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
    if record.exc_text:
        record.exc_text = REDACTOR.scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = REDACTOR.scrub(record.stack_info)


def install() -> None:
    """Scrub every log record at creation (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    previous_factory = logging.getLogRecordFactory()

    def scrubbing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous_factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the raw template only
            message = str(record.msg)
        record.msg = REDACTOR.scrub(message)
        record.args = None
        _scrub_exception_and_stack(record)
        return record

    logging.setLogRecordFactory(scrubbing_factory)
