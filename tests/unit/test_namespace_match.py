"""`--namespace` patterns: Kopf's semantics, with the cases Kopf's own tests cover."""

from __future__ import annotations

import pytest

from m2m_token_operator.kube.namespace_match import match_namespace, namespace_matcher

# (namespace, pattern, served): Kopf's tests/references/test_namespace_matching.py, then ours.
CASES = [
    # exact names
    ("ns1", "ns1", True),
    ("ns1", "ns", False),
    ("ns1", "", False),
    # globs
    ("ns1", "*", True),
    ("ns1", "ns*", True),
    ("ns1", "ns?", True),
    ("ns1", "ns??", False),
    ("ns1", "n*1", True),
    ("ns1", "n?1", True),
    ("ns1", "n??1", False),
    ("ns1", "*1", True),
    ("ns1", "?1", False),
    ("ns1", "??1", True),
    ("ns1", "ns*x", False),
    # comma lists: the globs after the first only re-include
    ("ns1", "ns1,ns2", True),
    ("ns1", "ns2,ns1", False),
    # spaces around globs are ignored
    ("ns1", " ns1", True),
    ("ns1", "ns1 ", True),
    ("ns1", " ns1 ", True),
    ("ns1", " ns1 , ns2 ", True),
    ("ns1", " ns2 , ns1 ", False),
    # exclusions after an inclusion
    ("ns1", "ns*,!ns1", False),
    ("ns1", "ns*,!ns2", True),
    # a first exclusion implies a catch-all inclusion before it
    ("ns1", "!ns1", False),
    ("ns1", "!ns2", True),
    ("ns1", "!ns*", False),
    # re-inclusion after an exclusion
    ("ns1", "ns*,!ns1,ns1", True),
    ("ns1", "ns*,!ns*,ns1", True),
    ("ns1", "!ns*,ns1", True),
    ("ns1", "!ns*,ns?", True),
    # Kopf's documented example: re-inclusion only of what the first glob matched
    ("myapp-test", "myapp-*, !*-pr-*, *pr-123", True),
    ("myapp-pr-123", "myapp-*, !*-pr-*, *pr-123", True),
    ("myapp-pr-456", "myapp-*, !*-pr-*, *pr-123", False),
    ("otherapp-pr-123", "myapp-*, !*-pr-*, *pr-123", False),
    ("otherapp-pr-123", "!*-pr-*, *pr-123", True),
    ("anyapp-anything", "!*-pr-*, *pr-123", True),
    ("myapp-pr-456", "!*-pr-*, *pr-123", False),
    # names are case-sensitive, and a glob is anchored at both ends
    ("NS1", "ns1", False),
    ("team-a-x", "team-a", False),
    ("x-team-a", "team-a*", False),
]


@pytest.mark.parametrize(("namespace", "pattern", "served"), CASES)
def test_match_namespace(namespace: str, pattern: str, served: bool) -> None:
    assert match_namespace(namespace, pattern) is served


@pytest.mark.parametrize(
    ("namespace", "patterns", "served"),
    [
        ("anything", [], True),
        ("team-b", ["team-*, !team-secret", "extra"], True),
        ("team-secret", ["team-*, !team-secret", "extra"], False),
        ("extra", ["team-*, !team-secret", "extra"], True),
        ("other", ["team-*, !team-secret", "extra"], False),
        ("team-secret", ["team-*, !team-secret", "team-secret"], True),
    ],
)
def test_namespace_matcher_serves_a_namespace_any_pattern_matches(
    namespace: str, patterns: list[str], served: bool
) -> None:
    assert namespace_matcher(patterns)(namespace) is served
