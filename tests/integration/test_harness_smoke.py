"""The harness itself works: Kopf against the emulator, and the token endpoint on the wire.

No business logic of the operator is involved: a tiny handlers file of our
own (``_smoke_handlers.py``) writes what the operator would write.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import Callable

import kubernetes
import requests

from ._smoke_handlers import SMOKE_TOKEN
from .harness import (
    CLIENT_SECRET,
    GROUP,
    PLURAL,
    VERSION,
    Kube,
    OperatorFactory,
    Reply,
    TokenEndpoint,
    wait_for,
)

SMOKE_HANDLERS = pathlib.Path(__file__).with_name("_smoke_handlers.py")


async def test_kopf_writes_an_owned_secret_and_the_status_through_the_emulator(
    kube: Kube, operator_factory: OperatorFactory
) -> None:
    run = operator_factory.start(path=SMOKE_HANDLERS)

    created = kube.create_token_request(
        "shop", "orders-api", {"target": {"application": "orders-api"}}
    )
    meta = created["metadata"]
    assert meta["uid"]
    assert meta["creationTimestamp"]
    assert meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0

    # The handler writes the Secret, patches it, then patches the status: wait for the last.
    status = await wait_for(lambda: kube.read_status("shop", "orders-api"))

    # The Secret, owned by the TokenRequest through its uid (the kubernetes client validated it).
    secret = kube.read_secret_object("shop", "orders-api-token")
    assert secret is not None
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TokenRequest",
            "name": "orders-api",
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert secret["metadata"]["annotations"] == {"smoke": "patched"}  # a strategic merge patch
    assert kube.read_secret("shop", "orders-api-token") == {"token": SMOKE_TOKEN}

    # The status, patched through the subresource: a new resourceVersion, the same generation.
    assert status == {"secretName": "orders-api-token", "observedGeneration": 1}
    after_status = kube.read_token_request("shop", "orders-api")
    assert after_status is not None
    assert after_status["metadata"]["generation"] == 1
    assert int(after_status["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])

    # A spec change bumps the generation; .status in a main-resource patch is ignored.
    patched = kube.patch_token_request(
        "shop", "orders-api", {"spec": {"refreshBefore": "10m"}, "status": {"secretName": "other"}}
    )
    assert patched["metadata"]["generation"] == 2
    assert patched["status"]["secretName"] == "orders-api-token"

    # The status subresource ignores .spec; the CRD schema prunes unknown fields.
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "shop", PLURAL, "orders-api",
        {"spec": {"refreshBefore": "1h"}, "status": {"failedAttempts": 0, "unknownField": 1}},
    )  # fmt: skip
    current = kube.read_token_request("shop", "orders-api")
    assert current is not None
    assert current["spec"]["refreshBefore"] == "10m"
    assert current["metadata"]["generation"] == 2
    assert current["status"] == {
        "secretName": "orders-api-token",
        "observedGeneration": 1,
        "failedAttempts": 0,
    }

    # The Event; and the garbage collector removes the Secret with its owner.
    events = await wait_for(lambda: kube.events_for("shop", "orders-api"))
    assert [e["reason"] for e in events] == ["SmokeWritten"]
    assert len([v for v in kube.versions("v1/secrets", "shop", "orders-api-token") if v]) == 2
    kube.delete_token_request("shop", "orders-api")
    await wait_for(lambda: kube.read_secret_object("shop", "orders-api-token") is None)

    run.stop()
    assert "smoke: wrote the Secret and the status of shop/orders-api" in "\n".join(run.logs)
    run.assert_never_logged(SMOKE_TOKEN, CLIENT_SECRET)


async def test_the_operator_restarts_as_a_fresh_process(
    kube: Kube, operator_factory: OperatorFactory
) -> None:
    first = operator_factory.start(path=SMOKE_HANDLERS)
    kube.create_token_request("shop", "before", {"scope": "api://a.b.c/.default"})
    await wait_for(lambda: kube.read_secret("shop", "before-token"))
    first.stop()

    kube.create_token_request("shop", "while-down", {"scope": "api://a.b.c/.default"})
    second = operator_factory.start(path=SMOKE_HANDLERS)
    assert second is not first
    assert first.exit_code == 0
    await wait_for(lambda: kube.read_secret("shop", "while-down-token"))


async def test_the_token_endpoint_answers_counts_and_follows_its_program(
    token_endpoint: TokenEndpoint,
) -> None:
    form = {
        "client_id": "a-client",
        "client_secret": CLIENT_SECRET,
        "grant_type": "client_credentials",
        "scope": "api://test-cluster.shop.orders-api/.default",
    }

    def post() -> requests.Response:
        return requests.post(token_endpoint.url, data=form, timeout=5)

    first, second = await asyncio.gather(asyncio.to_thread(post), asyncio.to_thread(post))
    assert first.status_code == second.status_code == 200
    assert first.json()["token_type"] == "Bearer"
    assert first.json()["expires_in"] == 3599
    assert first.json()["access_token"] != second.json()["access_token"]
    assert token_endpoint.count == 2
    assert [call.form for call in token_endpoint.calls] == [form, form]
    assert sorted(token_endpoint.tokens) == sorted(
        r.json()["access_token"] for r in (first, second)
    )

    token_endpoint.program(
        Reply.oauth_error(429, "temporarily_unavailable", retry_after=7), Reply.ok(expires_in="60")
    )
    throttled = await asyncio.to_thread(post)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "7"
    assert throttled.json()["error"] == "temporarily_unavailable"
    assert (await asyncio.to_thread(post)).json()["expires_in"] == "60"
    assert token_endpoint.count == 4
    assert [call.status for call in token_endpoint.calls] == [200, 200, 429, 200]


def _status_of(call: Callable[[], object]) -> tuple[int, str]:
    try:
        call()
    except kubernetes.client.ApiException as error:
        return error.status, json.loads(error.body)["reason"]
    raise AssertionError("the call succeeded")


async def test_the_emulator_keeps_the_api_servers_semantics(kube: Kube) -> None:
    tr = kube.create_token_request("shop", "tr", {"scope": "api://a.b.c/.default"})
    secret = kube.create_secret("shop", "owned", {"token": "t"}, labels={"app": "x"}, owner=tr)
    rv = secret["metadata"]["resourceVersion"]

    # A no-op write stores nothing and keeps the resourceVersion; a real one bumps it.
    same = kube.core.patch_namespaced_secret(
        "owned", "shop", {"metadata": {"labels": {"app": "x"}}}
    )
    assert same.metadata.resource_version == rv
    assert len(kube.versions("v1/secrets", "shop", "owned")) == 1
    kube.core.patch_namespaced_secret("owned", "shop", {"metadata": {"labels": {"app": "y"}}})

    # Optimistic concurrency, preconditions, the media types, missing namespaces.
    stale = {"metadata": {"name": "owned", "resourceVersion": rv}, "data": {}}
    assert _status_of(lambda: kube.core.replace_namespaced_secret("owned", "shop", stale)) == (
        409,
        "Conflict",
    )
    wrong_uid = {"preconditions": {"uid": "not-the-uid"}}
    assert _status_of(
        lambda: kube.core.delete_namespaced_secret("owned", "shop", body=wrong_uid)
    ) == (409, "Conflict")
    smp = {"spec": {"secretName": "x"}}
    assert _status_of(
        lambda: kube.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "shop",
            PLURAL,
            "tr",
            smp,
            _content_type="application/strategic-merge-patch+json",
        )
    ) == (415, "UnsupportedMediaType")
    assert _status_of(lambda: kube.core.read_namespaced_secret("owned", "nowhere")) == (
        404,
        "NotFound",
    )
    nowhere = {"metadata": {"name": "s"}}
    assert _status_of(lambda: kube.core.create_namespaced_secret("nowhere", nowhere)) == (
        404,
        "NotFound",
    )

    # Selectors on lists; a watch replays the changes after a resourceVersion.
    listed = kube.core.list_namespaced_secret("shop", label_selector="app in (y,z),!missing")
    assert [s.metadata.name for s in listed.items] == ["owned"]
    assert (
        kube.core.list_namespaced_secret("shop", field_selector="metadata.name!=owned").items == []
    )
    watch = kubernetes.watch.Watch()
    stream = watch.stream(
        kube.core.list_namespaced_secret, "shop", resource_version=rv, timeout_seconds=5
    )
    event = await asyncio.to_thread(next, stream)
    watch.stop()
    assert event["type"] == "MODIFIED"
    assert event["object"].metadata.labels == {"app": "y"}

    # Finalizers hold a deletion (which bumps the generation) until they are removed.
    kube.patch_token_request("shop", "tr", {"metadata": {"finalizers": ["test/hold"]}})
    kube.delete_token_request("shop", "tr")
    held = kube.read_token_request("shop", "tr")
    assert held is not None
    assert held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["generation"] == 2
    assert kube.read_secret("shop", "owned") is not None
    kube.patch_token_request("shop", "tr", {"metadata": {"finalizers": None}})
    assert kube.read_token_request("shop", "tr") is None
    await wait_for(lambda: kube.read_secret("shop", "owned") is None)  # the garbage collector

    # An owner reference that matches no live owner (here: a wrong uid) gets its object collected.
    owner = kube.create_token_request("shop", "owner", {"scope": "api://a.b.c/.default"})
    dangling = {**owner, "metadata": {**owner["metadata"], "uid": "0000-not-the-owner"}}
    kube.create_secret("shop", "dangling", {"token": "t"}, owner=dangling)
    await wait_for(lambda: kube.read_secret("shop", "dangling") is None)
