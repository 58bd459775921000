"""TokenRequests sharing one token: every subscriber's refreshBefore is honoured.

Issue 17, item 5: the shared token used to be refreshed at the LATEST point its
subscribers allowed, so one TokenRequest asking `refreshBefore: 5s` made another
asking `40s` get its token 22 s before expiry (90 s tokens). Now the earliest
need wins, each `refreshBefore` capped at half the lifetime.
"""

from __future__ import annotations

from datetime import timedelta

from m2m_token_operator.api.timefmt import parse_time

from ._token_endpoint import TokenEndpoint
from .harness import Kube, OperatorFactory
from .test_failures import NS, TARGET, wait_condition

NO_JITTER = {"M2M_REFRESH_JITTER_SECONDS": "0"}


def refresh_margin(status: dict[str, object]) -> timedelta:
    """How long before expiry the status says the token is refreshed."""
    return parse_time(str(status["expiresAt"])) - parse_time(str(status["refreshAt"]))


async def test_the_earliest_refresh_before_wins_on_a_shared_token(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    token_endpoint.expires_in = 90
    operator_factory.start(env=NO_JITTER)
    kube.create_token_request(NS, "careful", {**TARGET, "refreshBefore": "40s"})
    alone = await wait_condition(kube, "Ready", "True", name="careful")
    assert refresh_margin(alone) == timedelta(seconds=40)

    # Same identity and scope: the same token, and a subscriber asking for much less.
    kube.create_token_request(NS, "relaxed", {**TARGET, "refreshBefore": "5s"})
    shared = await wait_condition(kube, "Ready", "True", name="relaxed")
    assert shared["expiresAt"] == alone["expiresAt"]  # one token, no second call
    assert token_endpoint.count == 1
    assert refresh_margin(shared) == timedelta(seconds=40)  # not 22.5 s (the floor)
