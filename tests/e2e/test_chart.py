"""The Helm chart: lint, schema, the optional objects, and parity with manifests/.

These need the pinned helm (and, for the parity, the pinned kubectl's
kustomize) but no cluster; `test_helm_install.py` installs the chart on one.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from devenv.controlplane import Cluster
from devenv.install import MANIFESTS_DIR, OPERATOR_NAMESPACE, REPO_ROOT, read_documents
from m2m_token_operator.config.settings import Settings

from ._helm import (
    CHART_DIR,
    RELEASE,
    Manifest,
    container,
    documents,
    helm,
    kustomize,
    named,
    plain_env,
    render,
    template,
)
from ._support import kubectl

# Every value the chart has that renders an optional object, turned on.
EVERYTHING_ON: dict[str, Any] = {
    "clusterName": "prod-gcp",
    "operatorIdentity": {"namespaceSelector": "m2m.dev/operator-identity=allowed"},
    "allowedTokenEndpointHosts": ["login.microsoftonline.com", "*.example.com", "idp:8443"],
    "logging": {"format": "text", "level": "debug"},
    "tuning": {"retryInitialSeconds": 2.5, "fetchWorkers": 16, "retryAfterMaxSeconds": 2592000},
    "image": {"repository": "registry.example.com/m2m-token-operator", "tag": "0.1.0-rc1"},
    "imagePullSecrets": [{"name": "regcred"}],
    "extraEnv": [{"name": "M2M_FEDERATION_AUDIENCE", "value": "api://custom"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "podAnnotations": {"example.com/note": "yes"},
    "podLabels": {"team": "platform"},
    "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "mon"}}}]},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True, "namespace": "monitoring"},
    },
}

# The namespaced mode, the admission policy off and the NetworkPolicy's own selectors.
NAMESPACED_WITH_OWN_SELECTORS: dict[str, Any] = {
    "rbac": {"namespaced": True, "servedNamespaces": ["team-a", "team-b"]},
    "admissionPolicy": {"enabled": False},
    "networkPolicy": {
        "prometheus": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
            "podSelector": {
                "matchExpressions": [{"key": "app", "operator": "In", "values": ["prometheus"]}]
            },
        }
    },
}

# The shard of examples/shards/team-a.
SHARD_TEAM_A: dict[str, Any] = {"sharding": {"namespaces": ["team-a-*"], "name": "team-a"}}


def test_lint_strict(tmp_path: Path) -> None:
    plain = helm("lint", "--strict", str(CHART_DIR))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(EVERYTHING_ON))
    everything = helm("lint", "--strict", str(CHART_DIR), "--values", str(values))
    assert everything.returncode == 0, everything.stdout + everything.stderr
    assert "0 chart(s) failed" in everything.stdout
    modes = tmp_path / "modes.yaml"
    modes.write_text(yaml.safe_dump(NAMESPACED_WITH_OWN_SELECTORS))
    namespaced = helm("lint", "--strict", str(CHART_DIR), "--values", str(modes))
    assert namespaced.returncode == 0, namespaced.stdout + namespaced.stderr
    assert "0 chart(s) failed" in namespaced.stdout
    shard = tmp_path / "shard.yaml"
    shard.write_text(yaml.safe_dump(SHARD_TEAM_A))
    sharded = helm("lint", "--strict", str(CHART_DIR), "--values", str(shard))
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    assert "0 chart(s) failed" in sharded.stdout


# (values, what helm's schema error must say): each names the value's path.
BAD_VALUES = [
    ({"clusterName": "Prod_GCP"}, "at '/clusterName': 'Prod_GCP' does not match pattern"),
    ({"clusterName": "a" * 64}, "at '/clusterName'"),
    ({"replicaCount": 0}, "at '/replicaCount': minimum: got 0, want 1"),
    ({"replicaCount": "2"}, "at '/replicaCount': got string, want integer"),
    (
        {"operatorIdentity": {"namespaceSelector": "a=b=c"}},
        "at '/operatorIdentity/namespaceSelector'",
    ),
    (
        {"operatorIdentity": {"namespaceSelector": "env in a,b"}},
        "at '/operatorIdentity/namespaceSelector'",
    ),
    (
        {"operatorIdentity": {"namespaceSelector": "team=a b"}},
        "at '/operatorIdentity/namespaceSelector'",
    ),
    (
        {"operatorIdentity": {"existingSecret": "My_Secret"}},
        "at '/operatorIdentity/existingSecret'",
    ),
    (
        {"allowedTokenEndpointHosts": ["https://login.microsoftonline.com"]},
        "at '/allowedTokenEndpointHosts/0'",
    ),
    ({"allowedTokenEndpointHosts": ["login.*.com"]}, "at '/allowedTokenEndpointHosts/0'"),
    (
        {"allowedTokenEndpointHosts": "login.microsoftonline.com"},
        "at '/allowedTokenEndpointHosts': got string, want array",
    ),
    ({"tuning": {"retryInitialSeconds": 0}}, "at '/tuning/retryInitialSeconds': exclusiveMinimum"),
    ({"tuning": {"refreshJitterSeconds": -1}}, "at '/tuning/refreshJitterSeconds': minimum"),
    ({"tuning": {"retryMaxSeconds": 2592001}}, "at '/tuning/retryMaxSeconds': maximum"),
    ({"tuning": {"connectTimeoutSeconds": "5s"}}, "at '/tuning/connectTimeoutSeconds': got string"),
    ({"tuning": {"fetchWorkers": 0}}, "at '/tuning/fetchWorkers': minimum"),
    (
        {"tuning": {"retryInitalSeconds": 5}},
        "additional properties 'retryInitalSeconds' not allowed",
    ),
    ({"logging": {"level": "trace"}}, "at '/logging/level': value must be one of"),
    ({"logging": {"format": "xml"}}, "at '/logging/format': value must be one of"),
    ({"image": {"digest": "sha256:abc"}}, "at '/image/digest'"),
    ({"image": {"repository": "registry.example.com/m2m:0.1.0"}}, "at '/image/repository'"),
    ({"clustername": "prod"}, "additional properties 'clustername' not allowed"),
    ({"sharding": {"namespaces": ["Team_A"]}}, "at '/sharding/namespaces/0'"),
    # A shard's name: required with its namespaces, a DNS label the operator accepts.
    ({"sharding": {"namespaces": ["team-a"]}}, "at '/sharding/name': minLength: got 0, want 1"),
    ({"sharding": {"namespaces": ["team-a"], "name": "Team_A"}}, "at '/sharding/name'"),
    ({"sharding": {"namespaces": ["team-a"], "name": "a" * 41}}, "at '/sharding/name': maxLength"),
    ({"sharding": {"name": "team-a"}}, "at '/sharding/name': maxLength: got 6, want 0"),
    ({"metrics": {"port": 0}}, "at '/metrics/port': minimum"),
    ({"metrics": {"serviceMonitor": {"interval": "30"}}}, "at '/metrics/serviceMonitor/interval'"),
    # Namespaced mode: its namespaces, plain names, and only with it.
    ({"rbac": {"namespaced": True}}, "at '/rbac/servedNamespaces': minItems: got 0, want 1"),
    (
        {"rbac": {"namespaced": True, "servedNamespaces": ["team-*"]}},
        "at '/rbac/servedNamespaces/0'",
    ),
    ({"rbac": {"servedNamespaces": ["team-a"]}}, "at '/rbac/servedNamespaces': maxItems"),
    (
        {
            "rbac": {"namespaced": True, "servedNamespaces": ["team-a"]},
            "sharding": {"namespaces": ["b"]},
        },
        "at '/sharding/namespaces': maxItems",
    ),
    ({"rbac": {"namespaced": "yes"}}, "at '/rbac/namespaced': got string, want boolean"),
    ({"admissionPolicy": {"enabled": "true"}}, "at '/admissionPolicy/enabled': got string"),
    (
        {"networkPolicy": {"prometheus": {"podSelector": {"app": "prometheus"}}}},
        "at '/networkPolicy/prometheus/podSelector': additional properties 'app' not allowed",
    ),
]


@pytest.mark.parametrize(
    ("values", "message"),
    BAD_VALUES,
    ids=[message.split("'")[1] or message for _, message in BAD_VALUES],
)
def test_the_schema_rejects_what_the_operator_would_reject(
    tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    rendered = template(tmp_path, values)
    assert rendered.returncode != 0, rendered.stdout
    assert "values don't meet the specifications of the schema" in rendered.stderr
    assert message in rendered.stderr, rendered.stderr


def test_accepted_values_render_settings_the_operator_accepts(tmp_path: Path) -> None:
    docs = render(tmp_path, EVERYTHING_ON)
    env = plain_env(docs)
    assert env["M2M_CLUSTER_NAME"] == "prod-gcp"
    assert env["M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR"] == "m2m.dev/operator-identity=allowed"
    assert (
        env["M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS"]
        == "login.microsoftonline.com,*.example.com,idp:8443"
    )
    assert env["M2M_LOG_FORMAT"] == "text"
    assert env["M2M_RETRY_INITIAL_SECONDS"] == "2.5"
    assert env["M2M_FETCH_WORKERS"] == "16"
    assert env["M2M_RETRY_AFTER_MAX_SECONDS"] == "2592000"  # not 2.592e+06
    assert env["M2M_FEDERATION_AUDIENCE"] == "api://custom"
    # The operator reads them without complaint (the credentials directory aside:
    # it exists only in the pod).
    settings = Settings.from_env({k: v for k, v in env.items() if k != "M2M_CREDENTIALS_DIR"})
    assert settings.cluster_name == "prod-gcp"
    assert settings.fetch_workers == 16
    operator = container(docs)
    assert "--verbose" in operator["args"]
    assert operator["image"] == "registry.example.com/m2m-token-operator:0.1.0-rc1"
    pod = named(docs, "Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "platform"
    assert pod["metadata"]["annotations"] == {"example.com/note": "yes"}
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"
    policy = named(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"] == EVERYTHING_ON["networkPolicy"]["metricsFrom"]


def test_the_release_namespace_is_never_served(tmp_path: Path) -> None:
    rendered = template(
        tmp_path, {"rbac": {"namespaced": True, "servedNamespaces": ["team-a", OPERATOR_NAMESPACE]}}
    )
    assert rendered.returncode != 0, rendered.stdout
    assert f"rbac.servedNamespaces: {OPERATOR_NAMESPACE} is the release namespace" in (
        rendered.stderr
    )


def _operator_rules(docs: list[Manifest], service_account: str, namespace: str) -> dict[str, Any]:
    """(binding kind, binding namespace) -> the rules bound to the operator's ServiceAccount."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    bound: dict[str, Any] = {}
    for binding in docs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
        if subject not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        where = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], where, ref["name"])]
        key = f"{binding['kind']} {binding['metadata'].get('namespace', '')}".strip()
        bound.setdefault(key, []).extend(role["rules"])
    return bound


def test_namespaced_mode_grants_secrets_and_tokenrequests_in_the_served_namespaces_only(
    tmp_path: Path,
) -> None:
    docs = render(tmp_path, {"rbac": {"namespaced": True, "servedNamespaces": ["team-a", "b"]}})
    deployment = named(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    args = container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace=")] == [
        "--namespace=team-a",
        "--namespace=b",
    ]
    assert "--standalone" in args
    assert not [a for a in args if a.startswith(("--peering", "--all-namespaces"))]
    assert "PodDisruptionBudget" not in {d["kind"] for d in docs}

    bound = _operator_rules(docs, RELEASE, OPERATOR_NAMESPACE)
    assert set(bound) == {
        "ClusterRoleBinding",
        "RoleBinding team-a",
        "RoleBinding b",
        f"RoleBinding {OPERATOR_NAMESPACE}",  # the seal key
    }
    # Cluster-wide: read-only, and nothing on Secrets or TokenRequests.
    for rule in bound["ClusterRoleBinding"]:
        assert not {"secrets", "tokenrequests"} & set(rule["resources"]), rule
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    for served in ("team-a", "b"):
        rules = bound[f"RoleBinding {served}"]
        assert {"secrets", "tokenrequests"} <= {r for rule in rules for r in rule["resources"]}
    # The seal key's Role in the release namespace names its one Secret for reads.
    [seal_get, seal_create] = bound[f"RoleBinding {OPERATOR_NAMESPACE}"]
    assert seal_get["resourceNames"] == ["m2m-token-operator-seal-key"]
    assert seal_create["verbs"] == ["create"]
    # The cluster-wide default, for contrast: Secrets everywhere.
    default = _operator_rules(render(tmp_path), RELEASE, OPERATOR_NAMESPACE)
    assert any("secrets" in rule["resources"] for rule in default["ClusterRoleBinding"])


def test_the_admission_policy_names_the_releases_service_account_and_namespace(
    tmp_path: Path,
) -> None:
    rendered = template(
        tmp_path,
        {"serviceAccount": {"name": "token-operator"}},
        release="tokens",
        namespace="platform",
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = documents(rendered.stdout)
    policy = named(docs, "ValidatingAdmissionPolicy", "tokens-m2m-token-operator-secret-writes")
    binding = named(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {
        "policyName": "tokens-m2m-token-operator-secret-writes",
        "validationActions": ["Deny"],
    }
    [match] = policy["spec"]["matchConditions"]
    assert match["expression"] == (
        "request.userInfo.username == 'system:serviceaccount:platform:token-operator'"
    )
    seal_key = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}["sealKey"]
    assert seal_key == (
        "request.namespace == 'platform' && request.name == 'm2m-token-operator-seal-key'"
    )
    # The Deployment runs as that ServiceAccount.
    pod = named(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "token-operator"
    off = {d["kind"] for d in render(tmp_path, {"admissionPolicy": {"enabled": False}})}
    assert not off & {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}


def test_metrics_scrapes_are_admitted_from_the_prometheus_selectors(tmp_path: Path) -> None:
    elsewhere = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
        "podSelector": {"matchLabels": {"app": "prometheus-server"}},
    }
    docs = render(tmp_path, {"networkPolicy": {"prometheus": elsewhere}})
    [ingress] = named(docs, "NetworkPolicy")["spec"]["ingress"]
    assert ingress["from"] == [elsewhere]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_optional_monitoring_objects(tmp_path: Path) -> None:
    docs = render(tmp_path, EVERYTHING_ON)
    monitor = named(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = named(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # The PrometheusRule carries exactly the alerts of docs/alerts.yaml.
    rule = named(docs, "PrometheusRule")
    [shipped] = read_documents(REPO_ROOT / "docs" / "alerts.yaml")
    assert rule["spec"] == shipped["spec"]
    dashboard = named(docs, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    [(key, text)] = dashboard["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == json.loads((CHART_DIR / "dashboards" / key).read_text())
    # Off by default: a cluster without prometheus-operator has no such kinds.
    defaults = {d["kind"] for d in render(tmp_path)}
    assert not defaults & {"ServiceMonitor", "PrometheusRule", "ConfigMap"}


def test_a_shard_runs_two_standalone_replicas_elected_through_its_lease(tmp_path: Path) -> None:
    docs = render(tmp_path, {"sharding": {"namespaces": ["team-a", "team-a-*"], "name": "team-a"}})
    deployment = named(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert deployment["spec"]["template"]["metadata"]["labels"]["m2m.dev/shard"] == "team-a"
    args = container(docs)["args"]
    assert args[0] == "--standalone"
    assert args[-2:] == ["--namespace=team-a", "--namespace=team-a-*"]
    assert not [a for a in args if a.startswith(("--peering", "--all-namespaces"))]
    # M2M_SHARD from the pod label, as manifests/components/shard passes it.
    [shard] = [e for e in container(docs)["env"] if e["name"] == "M2M_SHARD"]
    assert shard["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.labels['m2m.dev/shard']"}}
    budget = named(docs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    # The Lease rights, in the release namespace only, bound to the chart's ServiceAccount.
    assert _lease_rules(docs, "m2m-token-operator") == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]


def _lease_rules(docs: list[Manifest], service_account: str) -> list[dict[str, Any]]:
    """The rules of the shard's Lease Role, after checking that it binds `service_account`."""
    role = named(docs, "Role", "m2m-token-operator-shard-leases")
    binding = named(docs, "RoleBinding", "m2m-token-operator-shard-leases")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == OPERATOR_NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "m2m-token-operator-shard-leases",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account, "namespace": OPERATOR_NAMESPACE}
    ]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_a_shards_replica_count_budget_and_service_account_follow_the_values(
    tmp_path: Path,
) -> None:
    three = render(
        tmp_path, {**SHARD_TEAM_A, "replicaCount": 3, "serviceAccount": {"name": "shard-sa"}}
    )
    assert named(three, "Deployment")["spec"]["replicas"] == 3
    assert (
        named(three, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "shard-sa"
    )
    assert _lease_rules(three, "shard-sa")
    # One replica: nothing to elect between, but the Lease still gates it; no budget.
    one = render(tmp_path, {**SHARD_TEAM_A, "replicaCount": 1})
    assert named(one, "Deployment")["spec"]["replicas"] == 1
    assert "PodDisruptionBudget" not in {d["kind"] for d in one}
    assert _lease_rules(one, "m2m-token-operator")


def test_a_shard_without_a_name_fails_even_without_the_schema(tmp_path: Path) -> None:
    rendered = template(
        tmp_path, {"sharding": {"namespaces": ["team-a"]}}, extra=["--skip-schema-validation"]
    )
    assert rendered.returncode != 0, rendered.stdout
    assert "sharding.name: required with sharding.namespaces" in rendered.stderr


def test_no_lease_rights_outside_sharding(tmp_path: Path) -> None:
    for values in ({}, {"rbac": {"namespaced": True, "servedNamespaces": ["team-a"]}}):
        docs = render(tmp_path, values)
        assert not [d for d in docs if "leases" in d["metadata"]["name"]]
        assert "M2M_SHARD" not in {e["name"] for e in container(docs)["env"]}
    # The namespaced mode stays one replica: no Lease elects an active one there.
    assert named(docs, "Deployment")["spec"]["replicas"] == 1


def test_image_by_digest_and_no_operator_identity(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    docs = render(
        tmp_path,
        {
            "image": {"repository": "r.example/m2m", "digest": digest},
            "operatorIdentity": {"existingSecret": ""},
        },
    )
    operator = container(docs)
    assert operator["image"] == f"r.example/m2m@{digest}"
    assert "M2M_CREDENTIALS_DIR" not in plain_env(docs)
    assert [m["name"] for m in operator["volumeMounts"]] == ["tmp"]
    pod = named(docs, "Deployment")["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]


def test_the_packaged_chart_carries_the_crds(tmp_path: Path) -> None:
    packaged = helm("package", str(CHART_DIR), "--destination", str(tmp_path))
    assert packaged.returncode == 0, packaged.stderr
    [archive] = tmp_path.glob("m2m-token-operator-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        crd = tar.extractfile("m2m-token-operator/crds/tokenrequests.m2m.dev.yaml")
        assert crd is not None
        assert crd.read() == (REPO_ROOT / "crds" / "tokenrequests.m2m.dev.yaml").read_bytes()
    assert "m2m-token-operator/crds/kopf-peering.yaml" in names
    assert "m2m-token-operator/values.schema.json" in names


# --- parity with manifests/ ------------------------------------------------------------

# The files of manifests/kustomization.yaml the chart must render the same, and
# those it deliberately does not (with why). A file added to the kustomization
# fails the test until it is listed here: add a template for it, or say why not.
PARITY_FILES = (
    "serviceaccount.yaml",
    "rbac.yaml",
    "federation-rbac.yaml",
    "user-rbac.yaml",
    "admission-policy.yaml",
    "deployment.yaml",
    "pdb.yaml",
    "networkpolicy.yaml",
    "service.yaml",
)
NOT_TEMPLATED = {
    # CRDs: the chart's crds/ holds copies (tests/unit/test_chart_files.py checks them).
    "../crds": "CustomResourceDefinition",
    "kopf-peering.yaml": "CustomResourceDefinition",
    # Helm installs into a namespace it does not own (helm install --create-namespace).
    "namespace.yaml": "Namespace",
}
# Labels Helm adds that kustomize does not; everything else must be equal.
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance")


def _without_helm_labels(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_helm_labels(v) for k, v in value.items() if k not in HELM_LABELS}
    if isinstance(value, list):
        return [_without_helm_labels(item) for item in value]
    return value


Key = tuple[str, str, str]  # kind, namespace ("" when cluster-scoped), name


def _key(doc: Manifest) -> Key:
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def _by_key(docs: list[Manifest]) -> dict[Key, Manifest]:
    by_key = {_key(d): _without_helm_labels(d) for d in docs}
    assert len(by_key) == len(docs), "two objects of the same kind, namespace and name"
    return by_key


def _assert_same_objects(from_chart: list[Manifest], expected: dict[Key, Manifest]) -> None:
    for doc in from_chart:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == "m2m-token-operator"
    actual = _by_key(from_chart)
    assert sorted(actual) == sorted(expected)
    for key, manifest in expected.items():
        assert actual[key] == manifest, f"{key} differs from kustomize's"


def test_default_values_render_what_kustomize_renders(tmp_path: Path) -> None:
    [kustomization] = read_documents(MANIFESTS_DIR / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == set(PARITY_FILES) | set(NOT_TEMPLATED), (
        "manifests/kustomization.yaml changed: list the new file in PARITY_FILES "
        "(and template it) or in NOT_TEMPLATED"
    )
    from_kustomize = kustomize()
    excluded_kinds = set(NOT_TEMPLATED.values())
    expected = _by_key([d for d in from_kustomize if d["kind"] not in excluded_kinds])
    # Every object the compared files define is in the comparison.
    defined = {_key(doc) for name in PARITY_FILES for doc in read_documents(MANIFESTS_DIR / name)}
    assert defined == set(expected)
    _assert_same_objects(render(tmp_path), expected)


def test_namespaced_mode_renders_what_kustomize_renders_for_examples_namespaced(
    tmp_path: Path,
) -> None:
    """examples/namespaced (manifests/components/namespaced serving team-a and team-b)."""
    example = REPO_ROOT / "examples" / "namespaced"
    [overlay] = read_documents(example / "kustomization.yaml")
    served = [r for r in overlay["resources"] if (example / r).is_dir() and r.startswith("team-")]
    assert served == ["team-a", "team-b"]
    excluded_kinds = set(NOT_TEMPLATED.values())
    expected = _by_key([d for d in kustomize(example) if d["kind"] not in excluded_kinds])
    # The component's own objects are in the comparison: Roles per namespace, no
    # cluster-wide operator ClusterRole, no PodDisruptionBudget.
    assert ("Role", "team-b", "m2m-token-operator") in expected
    assert ("ClusterRole", "", "m2m-token-operator-discovery") in expected
    assert ("ClusterRole", "", "m2m-token-operator") not in expected
    assert not [key for key in expected if key[0] == "PodDisruptionBudget"]
    _assert_same_objects(
        render(tmp_path, {"rbac": {"namespaced": True, "servedNamespaces": served}}), expected
    )


def test_sharding_renders_what_kustomize_renders_for_examples_shards_team_a(
    tmp_path: Path,
) -> None:
    """examples/shards/team-a (manifests/components/shard), one release per shard.

    Where the two forms differ by design: kustomize renders every shard in one
    namespace from one set of shared objects, so it names the shard's Deployment
    and budget after the shard and tells the shards' pods apart by the label
    m2m.dev/shard in their selectors; each Helm release has its own objects, named
    after the release, and its selector has the release's instance label (removed
    with Helm's labels here). And the component's own objects (the Lease Role and
    its binding) carry no labels, as kustomize adds the base's labels only to the
    base's objects.
    """
    excluded_kinds = set(NOT_TEMPLATED.values())
    from_kustomize = [
        d
        for d in kustomize(REPO_ROOT / "examples" / "shards" / "team-a")
        if d["kind"] not in excluded_kinds
    ]
    for doc in from_kustomize:
        if doc["kind"] in ("Deployment", "PodDisruptionBudget"):
            assert doc["metadata"]["name"] == "m2m-token-operator-team-a"
            doc["metadata"]["name"] = "m2m-token-operator"
            assert doc["spec"]["selector"]["matchLabels"].pop("m2m.dev/shard") == "team-a"
    expected = _by_key(from_kustomize)
    # The Lease rights are in the comparison; the namespaces' list/watch is in the
    # chart's ClusterRole (as unsharded), kustomize's component adds its own.
    lease_role = ("Role", OPERATOR_NAMESPACE, "m2m-token-operator-shard-leases")
    lease_binding = ("RoleBinding", OPERATOR_NAMESPACE, "m2m-token-operator-shard-leases")
    namespaces_role = ("ClusterRole", "", "m2m-token-operator-namespaces")
    namespaces_binding = ("ClusterRoleBinding", "", "m2m-token-operator-namespaces")
    assert expected.pop(namespaces_role)["rules"] == [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
    ]
    del expected[namespaces_binding]
    from_chart = render(tmp_path, SHARD_TEAM_A)
    cluster_role = named(from_chart, "ClusterRole", "m2m-token-operator")
    assert {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]} in (
        cluster_role["rules"]
    )
    for key in (lease_role, lease_binding):
        assert "labels" not in expected[key]["metadata"]
        [chart_doc] = [d for d in from_chart if _key(d) == key]
        expected[key]["metadata"]["labels"] = _without_helm_labels(chart_doc["metadata"]["labels"])
    _assert_same_objects(from_chart, expected)


@pytest.mark.usefixtures("operator_installed")
def test_every_optional_value_renders_objects_the_api_server_accepts(
    control_plane: Cluster, tmp_path: Path
) -> None:
    """Server-side dry run of what EVERYTHING_ON renders (the monitoring kinds aside:
    their CRDs belong to prometheus-operator), and of a sharded release."""
    values = {
        **EVERYTHING_ON,
        "metrics": {"dashboard": {"enabled": True}},  # in the release namespace
    }
    cases = (
        values,
        {"sharding": {"namespaces": ["team-a", "team-a-*"], "name": "team-a"}},
        # Served namespaces that exist in every cluster.
        {"rbac": {"namespaced": True, "servedNamespaces": ["default", "kube-public"]}},
    )
    for case in cases:
        rendered = template(tmp_path, case)
        assert rendered.returncode == 0, rendered.stderr
        result = kubectl(
            control_plane,
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=chart-test",
            "-f",
            "-",
            stdin=rendered.stdout,
        )
        assert result.returncode == 0, result.stderr
        assert "Warning" not in result.stderr, result.stderr
        assert "deployment.apps/m2m-token-operator serverside-applied" in result.stdout
