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
from collections import OrderedDict
from typing import Any

REDACTED = "[REDACTED]"
# Three base64url segments, the first one a JSON object ("eyJ" is `{"` encoded).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_MAX_VALUES = 4096  # the oldest values age out; they belong to long-gone tokens
_MIN_LENGTH = 6  # shorter strings would scrub ordinary words


class Redactor:
    """The secret values handled so far, found in a text in time linear in the text.

    Looking for each value in turn made every log line cost as much as the number
    of tokens held (thousands at scale); here the values are indexed by their first
    `_MIN_LENGTH` characters, so a line is scanned once, whatever their number.
    """

    def __init__(self) -> None:
        self._values: OrderedDict[str, None] = OrderedDict()
        self._by_prefix: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def register(self, value: str) -> None:
        if len(value) < _MIN_LENGTH:
            return
        with self._lock:
            if value in self._values:
                self._values.move_to_end(value)
                return
            self._values[value] = None
            self._by_prefix.setdefault(value[:_MIN_LENGTH], set()).add(value)
            while len(self._values) > _MAX_VALUES:
                oldest, _ = self._values.popitem(last=False)
                bucket = self._by_prefix[oldest[:_MIN_LENGTH]]
                bucket.discard(oldest)
                if not bucket:
                    del self._by_prefix[oldest[:_MIN_LENGTH]]

    def scrub(self, text: str) -> str:
        text = _JWT.sub(REDACTED, text)
        found: set[str] = set()
        with self._lock:
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
        return len(self._values)


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
