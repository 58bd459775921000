"""Log records are scrubbed of registered secrets and JWT-shaped strings at creation."""

import logging

import pytest

from m2m_token_operator import redaction

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
