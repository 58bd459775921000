"""The pinned helm (built by devenv, like the control plane) and the chart, for the tests."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from devenv.binaries import ensure_binaries, ensure_helm
from devenv.install import MANIFESTS_DIR, OPERATOR_NAMESPACE, REPO_ROOT

CHART_DIR = REPO_ROOT / "charts" / "m2m-token-operator"
# With this release name in OPERATOR_NAMESPACE the chart names every object as
# manifests/ does (the parity test compares them).
RELEASE = "m2m-token-operator"

# helm keeps its cache, config and data (repositories, plugins, registry logins)
# here, not in the home directory of whoever runs the tests.
_HELM_HOME = Path(tempfile.gettempdir()) / "m2m-token-operator-helm-home"

Manifest = dict[str, Any]


def helm(
    *args: str, kubeconfig: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR") if key in os.environ}
    env.update(
        HELM_CACHE_HOME=str(_HELM_HOME / "cache"),
        HELM_CONFIG_HOME=str(_HELM_HOME / "config"),
        HELM_DATA_HOME=str(_HELM_HOME / "data"),
    )
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run(
        [str(ensure_helm()), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=timeout,
    )


def values_file(directory: Path, values: Mapping[str, Any], name: str = "values.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
    return path


def template(
    directory: Path,
    values: Mapping[str, Any] | None = None,
    *,
    extra: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str = OPERATOR_NAMESPACE,
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with `values` (a values file), as `helm install` would."""
    args = ["template", release, str(CHART_DIR), "--namespace", namespace, *extra]
    if values is not None:
        args += ["--values", str(values_file(directory, values))]
    return helm(*args)


def documents(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(
    directory: Path, values: Mapping[str, Any] | None = None, *, extra: Sequence[str] = ()
) -> list[Manifest]:
    rendered = template(directory, values, extra=extra)
    assert rendered.returncode == 0, rendered.stderr
    return documents(rendered.stdout)


def kustomize(directory: Path = MANIFESTS_DIR) -> list[Manifest]:
    """`kubectl kustomize` with the pinned kubectl (no cluster needed)."""
    rendered = subprocess.run(
        [str(ensure_binaries().kubectl), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    return documents(rendered.stdout)


def named(docs: Sequence[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[d['kind'] for d in docs]}"
    return found[0]


def container(docs: Sequence[Manifest]) -> Manifest:
    pod = named(docs, "Deployment")["spec"]["template"]["spec"]
    [operator] = pod["containers"]
    result: Manifest = operator
    return result


def plain_env(docs: Sequence[Manifest]) -> dict[str, str]:
    """The operator container's env vars that have a plain value."""
    return {e["name"]: e["value"] for e in container(docs).get("env", []) if "value" in e}
