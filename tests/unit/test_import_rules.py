"""The import contract names every private subpackage of the installed Kopf."""

from __future__ import annotations

import configparser
import pkgutil
from pathlib import Path

import kopf

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
