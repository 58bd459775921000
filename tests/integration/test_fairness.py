"""A look waiting for a token request holds none of the looks' slots.

With one look per namespace (M2M_NAMESPACE_CONCURRENCY=1), a token request the
endpoint does not answer used to hold that one slot until its deadline: every other
TokenRequest of the namespace waited for it, even one whose token was cached.
Now the waiting look lends its slot; the namespace's token requests are bounded
by M2M_NAMESPACE_FETCH_CONCURRENCY instead.
"""

from __future__ import annotations

import threading

from ._token_endpoint import Reply, TokenCall, TokenEndpoint
from .harness import Kube, OperatorFactory, wait_for
from .test_failures import NS, wait_condition

HELD_APPLICATION = "held-api"  # the endpoint holds every call for this scope


def spec(application: str) -> dict[str, object]:
    return {"target": {"application": application, "namespace": "orders"}}


async def test_a_held_token_request_does_not_hold_the_namespace_look(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    released = threading.Event()

    def responder(call: TokenCall) -> Reply:
        if HELD_APPLICATION in call.form.get("scope", ""):
            released.wait(timeout=30)
        return Reply.ok()

    token_endpoint.responder = responder
    operator_factory.start(
        env={
            "M2M_NAMESPACE_CONCURRENCY": "1",
            "M2M_NAMESPACE_FETCH_CONCURRENCY": "1",
            # Far beyond the test: only the release ends the held request.
            "M2M_REQUEST_DEADLINE_SECONDS": "60",
            "M2M_READ_TIMEOUT_SECONDS": "60",
        }
    )
    try:
        kube.create_token_request(NS, "cached", spec("orders-api"))
        await wait_condition(kube, "Ready", "True", name="cached")

        kube.create_token_request(NS, "held", spec(HELD_APPLICATION))
        await wait_for(lambda: token_endpoint.count == 2, message="the held scope requested")
        # A new scope: its request waits for the namespace's one request slot.
        kube.create_token_request(NS, "queued", spec("billing-api"))
        # The scope of "cached": its look needs a slot, and no token request.
        kube.create_token_request(NS, "sharing", spec("orders-api"))

        await wait_condition(kube, "Ready", "True", name="sharing")
        # Its look came after that of "queued" (one slot, first come first served), so
        # "queued" had asked for its token by then: the request waits, not sent.
        assert token_endpoint.count == 2
        assert len(token_endpoint.calls) == 1  # the held request is still unanswered
        assert (kube.read_status(NS, "held") or {}).get("conditions") is None
    finally:
        released.set()
    await wait_condition(kube, "Ready", "True", name="held")
    await wait_condition(kube, "Ready", "True", name="queued")
    assert token_endpoint.count == 3
