"""Log records are scrubbed of registered secrets and JWT-shaped strings at creation."""

import gc
import json
import logging

import pytest
from kopf._core.actions.loggers import ObjectJsonFormatter, ObjectPrefixingJsonFormatter

from m2m_token_operator.tokens import redaction

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhYmMifQ.c2lnbmF0dXJl"


def test_registered_values_and_jwts_never_reach_a_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    redaction.install()
    redaction.REDACTOR.register("client-secret-value-42")
    logger = logging.getLogger("m2m_token_operator.test")
    with caplog.at_level(logging.DEBUG):
        logger.info("sending %s with %s", "client-secret-value-42", JWT)
        try:
            raise ValueError("bad client_secret=client-secret-value-42")
        except ValueError:
            logger.exception("failed")
    assert "client-secret-value-42" not in caplog.text
    assert JWT not in caplog.text
    assert caplog.text.count(redaction.REDACTED) >= 3
    assert "sending" in caplog.text


def test_short_values_are_not_registered() -> None:
    redactor = redaction.Redactor()
    redactor.register("abc")
    assert redactor.scrub("abc def") == "abc def"


SECRET = "client-secret-value-77"
# What Kopf installs for --log-format=json (with and without the object prefix), and text.
FORMATTERS = {
    "kopf-json": ObjectJsonFormatter,
    "kopf-prefixing-json": ObjectPrefixingJsonFormatter,
    "plain": logging.Formatter,
}


def _logged_exception_record() -> logging.LogRecord:
    """The record `logger.exception(..., stack_info=True)` hands to a handler."""
    redaction.install()
    redaction.REDACTOR.register(SECRET)
    logger = logging.getLogger("m2m_token_operator.test.formatters")
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture()
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"token endpoint rejected client_secret={SECRET} jwt={JWT}")
        except RuntimeError:
            logger.exception("refresh failed", stack_info=True)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1
    return records[0]


@pytest.mark.parametrize("name", FORMATTERS)
def test_exception_tracebacks_are_scrubbed_in_json_and_text_formats(name: str) -> None:
    output = FORMATTERS[name]().format(_logged_exception_record())
    assert SECRET not in output
    assert JWT not in output
    assert redaction.REDACTED in output
    # The traceback itself survives, scrubbed, not just the message.
    assert "Traceback (most recent call last)" in output
    assert "RuntimeError: token endpoint rejected client_secret=" in output
    assert "refresh failed" in output
    assert "Stack (most recent call last)" in output


@pytest.mark.parametrize("name", FORMATTERS)
def test_stack_info_is_scrubbed_in_json_and_text_formats(name: str) -> None:
    redaction.install()
    redaction.REDACTOR.register("stack-secret-value-13")
    record = logging.getLogger("m2m_token_operator.test.formatters").makeRecord(
        "m2m_token_operator.test.formatters",
        logging.ERROR,
        __file__,
        1,
        "with a stack",
        (),
        None,
        sinfo="Stack (most recent call last):\n  a frame echoing stack-secret-value-13",
    )
    output = FORMATTERS[name]().format(record)
    assert "stack-secret-value-13" not in output
    assert "a frame echoing " + redaction.REDACTED in output


def test_json_output_keeps_the_scrubbed_traceback_field() -> None:
    data = json.loads(ObjectJsonFormatter().format(_logged_exception_record()))
    assert "RuntimeError" in data["exc_info"]
    assert SECRET not in data["exc_info"]
    assert redaction.REDACTED in data["exc_info"]
    assert "Stack (most recent call last)" in data["stack_info"]


def test_every_one_of_thousands_of_values_is_found_and_the_oldest_unheld_age_out() -> None:
    redactor = redaction.Redactor()
    values = [f"token-{n:05d}-{'x' * 40}" for n in range(redaction._RECENT_VALUES + 10)]
    for value in values:
        redactor.register(value)
    assert len(redactor) == redaction._RECENT_VALUES
    newest, oldest = values[-1], values[0]
    assert redactor.scrub(f"a {newest} b") == f"a {redaction.REDACTED} b"
    assert redactor.scrub(f"a {oldest} b") == f"a {oldest} b"  # aged out: a long-gone token
    # Registering again keeps a value young; values that share a prefix are told apart.
    redactor.register(values[20])
    for value in values[-30:]:
        redactor.register(value + "-longer")  # ages out 30 more of the oldest, not values[20]
    text = f"{values[20]} {values[-2]}-longer {values[-3]}"
    assert redactor.scrub(text) == " ".join([redaction.REDACTED] * 3)


def test_a_value_that_contains_another_is_replaced_whole() -> None:
    redactor = redaction.Redactor()
    redactor.register("s3cr3t-value")
    redactor.register("prefix-s3cr3t-value-suffix")
    assert redactor.scrub("<prefix-s3cr3t-value-suffix>") == f"<{redaction.REDACTED}>"
    assert redactor.scrub("<s3cr3t-value>") == f"<{redaction.REDACTED}>"


class _Holder:
    """Stands for a token or credentials object that carries a secret value."""


def test_held_values_never_age_out_however_many_are_held() -> None:
    # Issue 18: at 10,000 TokenRequests the fixed 4,096 values let live tokens and client
    # secrets age out of the scrubber. Held values stay while their holder lives.
    redactor = redaction.Redactor()
    count = 5000  # more than the 4,096 recent values
    holders = [_Holder() for _ in range(count)]
    for index, holder in enumerate(holders):
        redactor.register(f"held-secret-{index:05d}", holder=holder)
    for index in range(count):  # as many one-use values after them
        redactor.register(f"one-use-assertion-{index:05d}")

    assert redactor.held == count
    for index in (0, 1, count // 2, count - 1):
        value = f"held-secret-{index:05d}"
        assert redactor.scrub(f"posting {value}") == f"posting {redaction.REDACTED}"
    # The one-use values are bounded as before: the oldest have aged out.
    assert redactor.scrub("one-use-assertion-00000") == "one-use-assertion-00000"
    assert redactor.scrub(f"one-use-assertion-{count - 1:05d}") == redaction.REDACTED


def test_a_released_value_stays_a_while_then_ages_out() -> None:
    redactor = redaction.Redactor(recent=2)
    holder = _Holder()
    redactor.register("token-value-released", holder=holder)
    redactor.register("token-value-released", holder=holder)  # each look registers it again
    other = _Holder()
    redactor.register("token-value-released", holder=other)  # another holder of the same
    del holder
    gc.collect()
    assert redactor.held == 1  # still held by `other`
    del other
    gc.collect()
    assert redactor.held == 0
    # Released: one of the recent values now, still scrubbed until two newer ones come.
    assert redactor.scrub("token-value-released") == redaction.REDACTED
    redactor.register("newer-value-1")
    redactor.register("newer-value-2")
    assert redactor.scrub("token-value-released") == "token-value-released"
    assert len(redactor) == 2
