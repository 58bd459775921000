"""Sharded mode: two operator processes serve disjoint namespace sets, each only its own.

As `manifests/components/shard` runs them: `--standalone` and a `--namespace`
glob each, with the component's read-only namespace RBAC and its Lease RBAC
next to the shipped RBAC; a shard's two replicas share the shard's Lease
(`M2M_SHARD`), one of them active. Each shard (and each replica) has its own
identity at its own issuer of the token server, so the `iss` claim of the
token in a Secret says which process wrote it, and each process's log says
which TokenRequests it handled.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from devenv.install import MANIFESTS_DIR, apply_objects, read_documents
from devenv.tokenserver import TokenServer, jwt_claims

from ._support import GROUP, PLURAL, VERSION, Kube, OperatorFactory, token_request

NAMESPACE_RBAC = MANIFESTS_DIR / "components" / "shard" / "namespace-rbac.yaml"
LEASE_RBAC = MANIFESTS_DIR / "components" / "shard" / "lease-rbac.yaml"
SHARDS = ("a", "b")


@pytest.fixture
def shard_namespaces(admin_api: k8s.ApiClient) -> Iterator[dict[str, list[str]]]:
    """Two namespaces per shard, named to match that shard's glob only."""
    apply_objects(admin_api, read_documents(NAMESPACE_RBAC))
    apply_objects(admin_api, read_documents(LEASE_RBAC))
    core = k8s.CoreV1Api(admin_api)
    custom = k8s.CustomObjectsApi(admin_api)
    run = uuid.uuid4().hex[:6]
    made = {shard: [f"shard-{run}-{shard}-{i}" for i in range(2)] for shard in SHARDS}
    for names in made.values():
        for name in names:
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    try:
        yield made
    finally:
        for names in made.values():
            for name in names:
                with contextlib.suppress(k8s.ApiException):
                    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, name, PLURAL)
                core.delete_namespace(name)


def test_two_shards_serve_disjoint_namespaces_and_never_each_others(
    start_operator: OperatorFactory,
    kube: Kube,
    token_server: TokenServer,
    shard_namespaces: dict[str, list[str]],
) -> None:
    run = shard_namespaces["a"][0].split("-")[1]
    operators = {
        shard: start_operator(
            name=f"shard-{shard}",
            issuer=f"shard-{shard}",
            args=("--standalone", f"--namespace=shard-{run}-{shard}-*"),
        )
        for shard in SHARDS
    }
    for shard in SHARDS:
        for namespace in shard_namespaces[shard]:
            kube.create_token_request(
                namespace, token_request("api", scope="api://shared/.default")
            )

    for shard in SHARDS:
        operator = operators[shard]
        for namespace in shard_namespaces[shard]:
            kube.wait_ready(namespace, "api", timeout=60, operator=operator)
            secret = kube.wait_secret(namespace, "api", operator=operator)
            # Written by this shard's process: its identity, at its issuer.
            issuer = jwt_claims(secret.token)["iss"]
            assert issuer == token_server.issuer_url(f"shard-{shard}"), (namespace, issuer)
            # The operator's line once it has looked at the object.
            operator.wait_for_log(rf"tokenrequest={namespace}/api .*looked at: Ready=", timeout=30)

    # Every TokenRequest was handled by exactly one process: each log names only its own
    # (its own lines name every one of its objects: tokenrequest=<namespace>/<name>).
    for shard, operator in operators.items():
        log = operator.log_text()
        other = next(s for s in SHARDS if s != shard)
        for namespace in shard_namespaces[other]:
            assert f"{namespace}/api" not in log, f"shard {shard} touched {namespace}/api"
        assert operator.running


def test_a_shards_standby_replica_serves_once_the_active_one_is_killed(
    start_operator: OperatorFactory,
    kube: Kube,
    token_server: TokenServer,
    shard_namespaces: dict[str, list[str]],
) -> None:
    run = shard_namespaces["a"][0].split("-")[1]
    glob = f"--namespace=shard-{run}-a-*"
    replicas = {}
    for name in ("shard-a-1", "shard-a-2"):
        replicas[name] = start_operator(
            name=name,
            issuer=name,  # the `iss` of a token says which replica wrote it
            args=("--standalone", glob),
            settings={"M2M_SHARD": f"a-{run}", "POD_ID": name},
        )
        if name == "shard-a-1":  # the first one takes the shard's Lease
            replicas[name].wait_for_log(r"Refreshes active: created the Lease", timeout=30)
    first, second = replicas["shard-a-1"], replicas["shard-a-2"]
    second.wait_for_log(r"Refreshes paused: the Lease \S+ is held by shard-a-1", timeout=30)

    before, after = shard_namespaces["a"]
    kube.create_token_request(before, token_request("api", scope="api://e2e.x.before/.default"))
    kube.wait_ready(before, "api", timeout=60, operator=first)
    secret = kube.wait_secret(before, "api", operator=first)
    assert jwt_claims(secret.token)["iss"] == token_server.issuer_url("shard-a-1")

    # The active replica dies without a word: the standby takes the Lease over once it
    # has not been renewed for its duration (15 s), and serves a new TokenRequest.
    first.kill()
    second.wait_for_log(r"Refreshes active: took the Lease \S+ over from shard-a-1", timeout=60)
    kube.create_token_request(after, token_request("api", scope="api://e2e.x.after/.default"))
    kube.wait_ready(after, "api", timeout=60, operator=second)
    secret = kube.wait_secret(after, "api", operator=second)
    assert jwt_claims(secret.token)["iss"] == token_server.issuer_url("shard-a-2")
    # Before the takeover the standby sent no token request: nothing it wrote is older.
    assert "token obtained" not in second.log_text().split("took the Lease")[0]
