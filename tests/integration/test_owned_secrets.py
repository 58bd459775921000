"""The owned Secrets after a start: a key's token is taken from whichever Secret holds it.

Issue 17, item 7: after a restart in the middle of a burst, new TokenRequests
fetched a token before the Secrets already written for the same key had seeded
the cache. Issue 18: the owned-Secrets watch carries metadata only, so a look
reads a Secret's data only to seed a key (one Secret per key) or after a change.
"""

from __future__ import annotations

import time

from devenv.faultproxy import Delay, Rule

from .harness import SECRETS, Kube, OperatorFactory, TokenEndpoint, wait_for
from .test_operator import TARGET, WRITES, wait_ready

NS = "shop"
OTHER_NS = "billing"
# Long enough that, without seeding from the holder's Secret first, the new TokenRequests'
# token request is sent (it is answered at once) while the holder's read is held.
HELD_SECONDS = 5.0


async def test_a_restart_fetches_no_token_that_some_secret_already_holds(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    first = operator_factory.start()
    kube.create_token_request(NS, "holder", TARGET)
    await wait_ready(kube, "holder")
    held = kube.read_secret(NS, "holder")
    assert held is not None
    assert token_endpoint.count == 1
    first.stop()  # all it knew is gone, as after a kill

    # While it is down, more TokenRequests of the same identity and scope arrive: they
    # have no Secret of their own yet. One is in another namespace.
    newcomers = [(NS, "newcomer-1"), (NS, "newcomer-2"), (OTHER_NS, "newcomer-3")]
    for namespace, name in newcomers:
        kube.create_token_request(namespace, name, TARGET)

    # The holder's Secret answers slowly, and so does the first list of Secrets: a new
    # TokenRequest that did not wait for them would fetch a token meanwhile.
    holder_path = rf"/namespaces/{kube.ns(NS)}/secrets/holder$"
    kube.proxy.add(Rule(Delay(HELD_SECONDS), method="GET", path=holder_path, watch=False))
    kube.proxy.add(Rule(Delay(HELD_SECONDS), method="GET", path=SECRETS, watch=False, times=2))
    restarted = time.monotonic()
    run = operator_factory.start(timeout=30)
    for namespace, name in newcomers:
        await wait_ready(kube, name, namespace)
        assert kube.read_secret(namespace, name) == held
    await wait_for(lambda: "reusing the unexpired token" in run.all_text, message="the key seeded")
    run.stop()
    assert token_endpoint.count == 1  # the restart made no token request at all
    # The token came from the holder's Secret, the only one whose data was read (the
    # newcomers' reads found nothing), and nothing was written to it: it held the token.
    after = kube.proxy.requests(path=r"/secrets/(holder|newcomer-\d)$", since=restarted)
    found = {r.path.rsplit("/", 1)[1] for r in after if r.method == "GET" and r.status == 200}
    assert found == {"holder"}
    assert [str(r) for r in after if r.method in WRITES and r.path.endswith("/holder")] == []


async def test_an_edit_after_a_restart_that_read_no_secret_is_repaired(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    """The restart infers the Secret's data from its seal (no read); the edit's watch event
    carries no data either, and is a version no look has seen: the look reads and repairs."""
    first = operator_factory.start()
    kube.create_token_request(NS, "orders-api", TARGET)
    await wait_ready(kube, "orders-api")
    original = kube.read_secret(NS, "orders-api")
    assert original is not None
    first.stop()

    restarted = time.monotonic()
    run = operator_factory.start()
    await wait_for(lambda: "reusing the unexpired token" in run.all_text, message="the key seeded")
    await wait_for(
        lambda: "looked at: Ready=" in run.all_text,
        message="the look after the restart done",
    )
    kube.patch_secret(NS, "orders-api", {"stringData": {"token": "tampered"}})
    await wait_for(
        lambda: kube.read_secret(NS, "orders-api") == original, message="restored after edit"
    )
    run.stop()
    assert token_endpoint.count == 1  # the seeded token, written back
    writes = kube.proxy.requests(path=r"/secrets/orders-api$", since=restarted)
    assert [r.method for r in writes if r.method in WRITES] == ["PUT"]


async def test_an_edit_during_the_look_that_wrote_the_secret_is_repaired(
    kube: Kube, token_endpoint: TokenEndpoint, operator_factory: OperatorFactory
) -> None:
    """A Secret event that arrives while a look at its TokenRequest is under way is judged
    when the look ends (the look's own write may be echoed before its answer is back).
    An edit made meanwhile is a version no look has seen then: it is read and repaired."""
    run = operator_factory.start()
    held = kube.proxy.add(
        Rule(Delay(60), method="PATCH", path=r"/tokenrequests/orders-api/status$")
    )
    kube.create_token_request(NS, "orders-api", TARGET)
    await wait_for(lambda: held.applied == 1, message="the look's status patch held")
    written = kube.read_secret(NS, "orders-api")  # written before the status, by this look
    assert written is not None
    kube.patch_secret(NS, "orders-api", {"stringData": {"token": "tampered"}})
    seen = f"Owned Secret {kube.ns(NS)}/orders-api: MODIFIED"
    await wait_for(lambda: seen in run.all_text, message="the edit seen during the look")
    kube.proxy.clear()  # the held status patch goes on: the look ends
    await wait_for(
        lambda: kube.read_secret(NS, "orders-api") == written, message="restored after the edit"
    )
    assert token_endpoint.count == 1
