"""Issue #20: no class of the package carries more than one job, and none is over 300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import m2m_token_operator

MAX_CLASS_LINES = 300
PACKAGE = Path(m2m_token_operator.__file__).parent


def class_sizes() -> dict[str, int]:
    sizes: dict[str, int] = {}
    for module in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                where = f"{module.relative_to(PACKAGE)}:{node.name}"
                sizes[where] = node.end_lineno - node.lineno + 1
    return sizes


def test_no_class_of_the_package_is_over_300_lines() -> None:
    sizes = class_sizes()
    assert "tokens/cache.py:TokenCache" in sizes  # the walk found the package's classes
    assert {where: lines for where, lines in sizes.items() if lines > MAX_CLASS_LINES} == {}
