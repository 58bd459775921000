"""Refresh points and retry times, computed exactly from made-up times."""

from datetime import UTC, datetime, timedelta

import pytest

from m2m_token_operator.tokens.credentials import CredentialsError
from m2m_token_operator.tokens.model import (
    AccessToken,
    CredentialsRejected,
    EndpointUnavailable,
    ScopeRejected,
    Throttled,
)
from m2m_token_operator.tokens.timing import RefreshPolicy, RetryPolicy

ISSUED = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
REFRESH = RefreshPolicy()
RETRY = RetryPolicy()


def token(seconds: float) -> AccessToken:
    return AccessToken(
        value="t",
        token_type="Bearer",
        issued_at=ISSUED,
        expires_at=ISSUED + timedelta(seconds=seconds),
    )


def after_issue(moment: datetime) -> float:
    return (moment - ISSUED).total_seconds()


def test_default_refresh_of_a_one_hour_token_is_about_40_minutes_after_issue() -> None:
    hour = token(3599)
    without_jitter = REFRESH.refresh_at(hour, refresh_before=None, jitter_fraction=0.0)
    full_jitter = REFRESH.refresh_at(hour, refresh_before=None, jitter_fraction=1.0)
    assert after_issue(without_jitter) == pytest.approx(3599 * 2 / 3)  # 39 min 59 s
    assert after_issue(full_jitter) == pytest.approx(3599 * 2 / 3 - 30)
    halfway = REFRESH.refresh_at(hour, refresh_before=None, jitter_fraction=0.5)
    assert after_issue(halfway) == pytest.approx(3599 * 2 / 3 - 15)


def test_refresh_before_ten_minutes() -> None:
    hour = token(3599)
    point = REFRESH.refresh_at(hour, refresh_before=timedelta(minutes=10), jitter_fraction=0.0)
    assert hour.expires_at - point == timedelta(minutes=10)
    jittered = REFRESH.refresh_at(hour, refresh_before=timedelta(minutes=10), jitter_fraction=1)
    assert hour.expires_at - jittered == timedelta(minutes=10, seconds=30)  # earlier, never later


def test_ten_minute_token() -> None:
    short = token(600)
    assert after_issue(REFRESH.refresh_at(short, refresh_before=None, jitter_fraction=0)) == 400
    # jitter is capped at 5 % of the lifetime: 30 s here.
    assert after_issue(REFRESH.refresh_at(short, refresh_before=None, jitter_fraction=1)) == 370
    # refreshBefore longer than the lifetime cannot be honoured: the default rule applies.
    long_ask = REFRESH.refresh_at(short, refresh_before=timedelta(hours=1), jitter_fraction=0)
    assert after_issue(long_ask) == 400
    # refreshBefore just short of the lifetime: not sooner than min_interval (60 s) after issue.
    near_ask = REFRESH.refresh_at(short, refresh_before=timedelta(seconds=599), jitter_fraction=0)
    assert after_issue(near_ask) == 60
    # refreshBefore tiny: not later than the floor (60 s) before expiry.
    tiny_ask = REFRESH.refresh_at(short, refresh_before=timedelta(seconds=1), jitter_fraction=0)
    assert after_issue(tiny_ask) == 540


def test_five_second_token_clamps_shrink_with_the_lifetime() -> None:
    tiny = token(5)
    default = REFRESH.refresh_at(tiny, refresh_before=None, jitter_fraction=1)
    assert after_issue(default) == pytest.approx(5 * 2 / 3 - 0.25)  # jitter ≤ 5 % = 0.25 s
    late = REFRESH.refresh_at(tiny, refresh_before=timedelta(seconds=1), jitter_fraction=0)
    assert after_issue(late) == pytest.approx(3.75)  # floor = lifetime / 4
    early = REFRESH.refresh_at(tiny, refresh_before=timedelta(seconds=4), jitter_fraction=0)
    assert after_issue(early) == pytest.approx(2.5)  # min interval = lifetime / 2
    too_long = REFRESH.refresh_at(tiny, refresh_before=timedelta(minutes=10), jitter_fraction=0)
    assert after_issue(too_long) == pytest.approx(5 * 2 / 3)  # cannot be honoured: the default


def test_three_second_token_is_refreshed_before_it_expires() -> None:
    tiny = token(3)
    for fraction in (0.0, 0.5, 1.0):
        for ask in (None, timedelta(seconds=1), timedelta(hours=1)):
            point = REFRESH.refresh_at(tiny, refresh_before=ask, jitter_fraction=fraction)
            assert 1.5 <= after_issue(point) <= 2.25


def test_28_hour_token() -> None:
    long = token(28 * 3600)
    default = REFRESH.refresh_at(long, refresh_before=None, jitter_fraction=0)
    assert default - ISSUED == timedelta(hours=28) * 2 / 3
    ten_min = REFRESH.refresh_at(long, refresh_before=timedelta(minutes=10), jitter_fraction=1)
    assert long.expires_at - ten_min == timedelta(minutes=10, seconds=30)  # jitter capped at 30 s
    too_close = REFRESH.refresh_at(long, refresh_before=timedelta(seconds=5), jitter_fraction=0)
    assert long.expires_at - too_close == timedelta(seconds=60)


@pytest.mark.parametrize("ask", [timedelta(seconds=3599), timedelta(hours=1), timedelta(days=2)])
def test_refresh_before_not_shorter_than_the_lifetime_falls_back_to_the_default(
    ask: timedelta,
) -> None:
    """Like cert-manager's renewBefore >= duration: not a refresh every min_interval."""
    hour = token(3599)
    for fraction in (0.0, 0.5, 1.0):
        asked = REFRESH.refresh_at(hour, refresh_before=ask, jitter_fraction=fraction)
        default = REFRESH.refresh_at(hour, refresh_before=None, jitter_fraction=fraction)
        assert asked == default
    point = REFRESH.refresh_at(hour, refresh_before=ask, jitter_fraction=1)
    assert after_issue(point) == pytest.approx(3599 * 2 / 3 - 30)  # with the usual jitter


def test_refresh_before_just_short_of_the_lifetime_is_still_clamped_to_min_interval() -> None:
    hour = token(3599)
    point = REFRESH.refresh_at(hour, refresh_before=timedelta(seconds=3598), jitter_fraction=0)
    assert after_issue(point) == 60


# A token shared by several TokenRequests


def test_shared_the_earliest_need_wins() -> None:
    """90 s tokens, subscribers asking 40 s and 5 s: refreshed 40 s before expiry."""
    short = token(90)
    point = REFRESH.shared_refresh_at(
        short, refresh_befores=[timedelta(seconds=40), timedelta(seconds=5)], jitter_fraction=0
    )
    assert short.expires_at - point == timedelta(seconds=40)
    hour = token(3600)
    with_default = REFRESH.shared_refresh_at(
        hour, refresh_befores=[None, timedelta(seconds=1)], jitter_fraction=0
    )
    assert after_issue(with_default) == 2400  # the default rule's point, not the late one


@pytest.mark.parametrize(
    "ask", [timedelta(minutes=31), timedelta(minutes=59), timedelta(hours=1), timedelta(days=2)]
)
def test_shared_a_refresh_before_over_half_the_lifetime_counts_as_half(ask: timedelta) -> None:
    hour = token(3600)
    for fraction in (0.0, 0.5, 1.0):
        point = REFRESH.shared_refresh_at(
            hour, refresh_befores=[None, ask], jitter_fraction=fraction
        )
        assert after_issue(point) == 1800  # not sooner, not even by the jitter


def test_shared_tiny_tokens_stay_within_their_lifetime() -> None:
    tiny = token(3)
    for ask in (None, timedelta(seconds=1), timedelta(hours=1)):
        point = REFRESH.shared_refresh_at(
            tiny, refresh_befores=[ask, timedelta(seconds=2)], jitter_fraction=1
        )
        assert 1.5 <= after_issue(point) <= 2.25


NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def delay(*, failures: int, error: Exception, jitter_fraction: float) -> float:
    moment = RETRY.next_attempt_at(
        now=NOW, failures=failures, error=error, jitter_fraction=jitter_fraction
    )
    return (moment - NOW).total_seconds()


def test_backoff_sequence_doubles_up_to_the_cap() -> None:
    error = EndpointUnavailable("down")
    # jitter_fraction 0.5 is the midpoint of the ±25 % band.
    sequence = [delay(failures=n, error=error, jitter_fraction=0.5) for n in range(1, 10)]
    assert sequence == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert delay(failures=10_000, error=error, jitter_fraction=0.5) == 300


def test_backoff_with_a_long_initial_delay_does_not_overflow() -> None:
    """initial·2^40 is past what a timedelta holds once initial is over 79 s."""
    slow = RetryPolicy(initial=timedelta(seconds=100), maximum=timedelta(days=1))
    assert slow.backoff(failures=41, jitter_fraction=0.5) == timedelta(days=1)
    assert slow.backoff(failures=10_000, jitter_fraction=0.5) == timedelta(days=1)


def test_backoff_jitter_bounds() -> None:
    error = EndpointUnavailable("down")
    assert delay(failures=1, error=error, jitter_fraction=0) == 5  # never below initial
    assert delay(failures=1, error=error, jitter_fraction=1) == 6.25
    assert delay(failures=4, error=error, jitter_fraction=0) == 30
    assert delay(failures=4, error=error, jitter_fraction=1) == 50
    assert delay(failures=9, error=error, jitter_fraction=0) == 225
    assert delay(failures=9, error=error, jitter_fraction=1) == 300  # never above maximum


def test_retry_after_is_honoured_and_capped_at_one_hour() -> None:
    assert delay(failures=1, error=Throttled("slow down", retry_after=7), jitter_fraction=0) == 7
    # A Retry-After shorter than the backoff does not shorten it.
    assert delay(failures=5, error=Throttled("x", retry_after=1), jitter_fraction=0.5) == 80
    huge = Throttled("x", retry_after=10 * 86400)
    assert delay(failures=1, error=huge, jitter_fraction=0) == 3600
    assert delay(failures=1, error=Throttled("x", retry_after=1e300), jitter_fraction=0) == 3600
    with_503 = EndpointUnavailable("x", retry_after=120)
    assert delay(failures=1, error=with_503, jitter_fraction=0) == 120


@pytest.mark.parametrize(
    "error",
    [
        CredentialsRejected("no"),
        ScopeRejected("no"),
        CredentialsError("missing", reason="CredentialsMissing"),
    ],
)
def test_permanent_failures_are_held(error: Exception) -> None:
    assert delay(failures=1, error=error, jitter_fraction=0) == 300
    assert delay(failures=50, error=error, jitter_fraction=1) == 300


def test_unknown_exceptions_back_off_like_transient_ones() -> None:
    assert delay(failures=3, error=RuntimeError("bug"), jitter_fraction=0.5) == 20


# While the token served is still valid


def until_valid(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def delay_before(valid_for: float, *, failures: int, error: Exception) -> float:
    moment = RETRY.next_attempt_at(
        now=NOW,
        failures=failures,
        error=error,
        jitter_fraction=0.5,
        valid_until=until_valid(valid_for),
    )
    return (moment - NOW).total_seconds()


def test_transient_retries_wait_at_most_a_third_of_the_time_left() -> None:
    error = EndpointUnavailable("down")
    assert delay_before(9, failures=1, error=error) == 3  # not the 5 s backoff
    assert delay_before(9, failures=2, error=error) == 3  # nor 10 s, past the expiry
    assert delay_before(1200, failures=9, error=error) == 300  # the cap is shorter
    assert delay_before(600, failures=9, error=error) == 200
    assert delay_before(2, failures=1, error=error) == 1  # the floor
    assert delay_before(0.5, failures=1, error=error) == 1  # the floor, even past expiry


def test_the_deadline_keeps_retry_after_and_the_hold() -> None:
    throttled = Throttled("slow down", retry_after=7)
    assert delay_before(9, failures=1, error=throttled) == 7
    assert delay_before(9, failures=1, error=CredentialsRejected("no")) == 300


def test_without_a_valid_token_the_backoff_is_unchanged() -> None:
    error = EndpointUnavailable("down")
    expired = RETRY.next_attempt_at(
        now=NOW, failures=2, error=error, jitter_fraction=0.5, valid_until=until_valid(-1)
    )
    assert (expired - NOW).total_seconds() == 10
