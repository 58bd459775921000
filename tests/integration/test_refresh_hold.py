"""A forced refresh (m2m.dev/refresh) meets the hold after a rejected credential.

Issue 17, item 6: N TokenRequests whose credentials were rejected, and a loop that
changes their m2m.dev/refresh annotation, used to send N token requests per 10 s
to Entra ID. Only a new secret or scope can fix a rejection, and those are tried
at once anyway; the annotation alone waits for the hold.
"""

from __future__ import annotations

import functools
from typing import Any

from ._token_endpoint import Reply, TokenEndpoint
from .harness import Kube, OperatorRun, wait_for
from .test_failures import AADSTS7000215, NS, by_type, wait_condition

NAMES = ("orders-api", "billing-api", "stock-api")  # three scopes: three keys


def spec(name: str) -> dict[str, object]:
    return {"target": {"application": name, "namespace": "orders"}}


def refresh_handled(kube: Kube, name: str, value: str) -> dict[str, Any] | None:
    """The status once it records `value` as the last refresh request handled."""
    status = kube.read_status(NS, name) or {}
    return status if status.get("lastRefreshRequest") == value else None


async def test_forced_refreshes_of_rejected_credentials_wait_for_the_hold(
    kube: Kube, token_endpoint: TokenEndpoint, operator: OperatorRun
) -> None:
    token_endpoint.always(
        Reply.oauth_error(401, "invalid_client", AADSTS7000215, error_codes=(7000215,))
    )
    for name in NAMES:
        kube.create_token_request(NS, name, spec(name))
    for name in NAMES:
        await wait_condition(kube, "Ready", "False", "CredentialsRejected", name=name)
    assert token_endpoint.count == len(NAMES)

    for name in NAMES:
        kube.patch_token_request(NS, name, {"metadata": {"annotations": {"m2m.dev/refresh": "1"}}})
    for name in NAMES:
        # Handled: the value is recorded in status (it always was; the call is what changed).
        handled = await wait_for(
            functools.partial(refresh_handled, kube, name, "1"),
            message=f"the refresh request of {name} handled",
        )
        assert by_type(handled)["Degraded"]["reason"] == "CredentialsRejected"
    assert token_endpoint.count == len(NAMES)  # no call during the hold
