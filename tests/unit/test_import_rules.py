"""The import contract names every private subpackage of the installed Kopf."""

from __future__ import annotations

import configparser
import functools
import pkgutil
from pathlib import Path

import grimp
import kopf

PACKAGE = "m2m_token_operator"
IMPORTLINTER = Path(__file__).parents[2] / ".importlinter"


def test_the_contract_forbids_every_private_kopf_subpackage() -> None:
    # import-linter has no `kopf._*` wildcard, so the contract lists them; a new one must be added.
    config = configparser.ConfigParser()
    config.read(IMPORTLINTER)
    forbidden = set(config["importlinter:contract:no-private-kopf"]["forbidden_modules"].split())
    names = [module.name for module in pkgutil.iter_modules(kopf.__path__)]
    private = {
        f"kopf.{name}" for name in names if name.startswith("_") and not name.startswith("__")
    }
    assert private
    assert private <= forbidden


# The modules below the Kubernetes plumbing: settings, spec, tokens, status. Kept light so
# that each can be read, tested and type-checked without the kubernetes client.
LOWER_MODULES = (
    "api.constants",
    "api.timefmt",
    "api.kube_names",
    "kube.namespace_match",
    "api.spec",
    "tokens.timing",
    "tokens.credentials",
    "tokens.model",
    "config.settings",
    "reconcile.status",
)


@functools.cache
def _graph() -> grimp.ImportGraph:
    # External packages are nodes of their own (`kubernetes`), not read: milliseconds.
    return grimp.build_graph("m2m_token_operator", include_external_packages=True, cache_dir=None)


def test_the_lower_modules_do_not_import_the_kubernetes_client() -> None:
    graph = _graph()
    chains = {
        name: graph.find_shortest_chain(
            importer=f"m2m_token_operator.{name}", imported="kubernetes"
        )
        for name in LOWER_MODULES
    }
    assert chains == dict.fromkeys(LOWER_MODULES)


def test_no_two_modules_of_ours_import_each_other() -> None:
    # Type-checking imports count: a circle through them is one for mypy and for readers.
    graph = _graph()
    ours = sorted(m for m in graph.modules if m.startswith(f"{PACKAGE}."))
    reach = {m: graph.find_downstream_modules(m) for m in ours}
    circles = [(a, b) for a in ours for b in reach[a] if b > a and a in reach.get(b, set())]
    assert circles == []
