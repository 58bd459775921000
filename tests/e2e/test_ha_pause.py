"""A replica that learns it is paused sends nothing more: no token request, no API write.

Two replicas with Kopf's peering and distinct priorities, each with its own
token endpoint (a slow one for the low replica) and its own fault proxy in
front of the API server, so that every request is recorded per replica. The
low one starts alone and works through a burst of a few hundred TokenRequests,
one token request each; the high one joins while most of that work is still
queued. From the low one's own signal that it paused ("Refreshes paused") to
the high one's positive end (every TokenRequest Ready), the low one's records
must stay empty: no token request, no write (Kopf's own peering keep-alive
aside). Before issue 17 the paused replica went on through its queue.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from devenv.faultproxy import Exchange, FaultProxy
from devenv.install import PEERING_NAME
from devenv.operatorprocess import Identity, OperatorProcess
from tests.integration._token_endpoint import Reply, TokenEndpoint
from tests.integration.harness import write_kubeconfig

from ._support import ALL_NAMESPACES, CLUSTER_NAME, Kube, condition_of, token_request, wait_for

TOKEN_REQUESTS = 200
SLOW_TOKEN_SECONDS = 1.0  # 200 of them take the low replica about a minute alone
PAUSED = "Refreshes paused: peers with the same or a higher priority"
RESUMED = "Resuming operations after the pause"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


class Replica:
    """One operator process with its own token endpoint and its own API proxy."""

    def __init__(
        self, name: str, *, priority: int, admin_api: k8s.ApiClient, token: str, log_dir: Path
    ) -> None:
        configuration = admin_api.configuration
        self.proxy = FaultProxy(configuration.host, ca_file=configuration.ssl_ca_cert).start()
        self.endpoint = TokenEndpoint()
        self.endpoint.start()
        kubeconfig = write_kubeconfig(log_dir / f"{name}.kubeconfig", self.proxy.url, token)
        self.process = OperatorProcess(
            kubeconfig=kubeconfig,
            log_file=log_dir / f"{name}.log",
            identity=Identity(
                client_id=f"e2e-{name}",
                client_secret=f"e2e-{name}-secret",
                token_endpoint=self.endpoint.url,
            ),
            cluster_name=CLUSTER_NAME,
            args=["--peering=" + PEERING_NAME, "--verbose"],
            settings={
                "M2M_PEERING_PRIORITY": str(priority),
                "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true",
                "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": "127.0.0.1",
                "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": ALL_NAMESPACES,
            },
            name=name,
        )

    def writes_since(self, mark: float) -> list[Exchange]:
        """Writes that reached the proxy after `mark`: one sent before it may be answered
        after it (the API server is busy with the other replica's burst)."""
        return [
            exchange
            for exchange in self.proxy.requests(since=mark)
            if exchange.method in WRITES
            and "kopfpeerings" not in exchange.path
            and exchange.received_at >= mark
        ]

    def token_requests_since(self, mark: float) -> int:
        return sum(1 for call in self.endpoint.calls if call.received_at >= mark)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.process.stop()
        self.endpoint.stop()
        self.proxy.stop()


@pytest.fixture
def replicas(
    admin_api: k8s.ApiClient, operator_kubeconfig: Path, tmp_path: Path
) -> Iterator[dict[str, Replica]]:
    config = yaml.safe_load(operator_kubeconfig.read_text())
    token = config["users"][0]["user"]["token"]
    made: dict[str, Replica] = {}
    try:
        for name, priority in (("low", 100), ("high", 200)):
            made[name] = Replica(
                name, priority=priority, admin_api=admin_api, token=token, log_dir=tmp_path
            )
        yield made
    finally:
        for replica in made.values():
            replica.close()
        for replica in made.values():
            print(f"--- {replica.process.name} log, last part:")  # shown when the test fails
            print(replica.process.log_tail(20000))


def _all_ready(kube: Kube, namespace: str) -> bool:
    items = kube.list_token_requests(namespace)
    return len(items) == TOKEN_REQUESTS and all(
        condition_of(item.get("status") or {}, "Ready").get("status") == "True" for item in items
    )


def test_a_paused_replica_sends_no_token_request_and_no_write_after_it_learnt_of_the_pause(
    kube: Kube, namespace: str, replicas: dict[str, Replica]
) -> None:
    low, high = replicas["low"], replicas["high"]
    low.endpoint.always(Reply.ok(delay=SLOW_TOKEN_SECONDS))
    low.process.start()
    low.process.wait_for_log(RESUMED, timeout=30)
    low.process.wait_for_log("Refreshes active", timeout=30)

    # One scope each: every TokenRequest costs one (slow) token request.
    for index in range(TOKEN_REQUESTS):
        kube.create_token_request(
            namespace, token_request(f"burst-{index}", scope=f"api://e2e.burst.s{index}/.default")
        )
    wait_for(lambda: low.endpoint.count >= 10, timeout=60, what="the low replica at work")

    before_high = low.process.log_size()
    high.process.start()
    low.process.wait_for_log(PAUSED, timeout=30, since=before_high)
    # Taken after the low replica's own signal: whatever it sent before is allowed.
    mark = time.monotonic()
    sent_before_pause = low.endpoint.count
    assert sent_before_pause < TOKEN_REQUESTS  # the pause came with work still queued

    high.process.wait_for_log(RESUMED, timeout=60)
    wait_for(lambda: _all_ready(kube, namespace), timeout=120, what="every TokenRequest Ready")
    assert high.endpoint.count > 0  # the high replica served the rest

    assert low.token_requests_since(mark) == 0
    assert low.writes_since(mark) == []
