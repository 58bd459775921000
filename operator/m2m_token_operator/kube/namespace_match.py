"""The `--namespace` patterns the operator serves, matched as Kopf matches them.

Kopf decides which TokenRequests reach the handlers from its `--namespace`
options; our Secret watches and the TokenRequest watch must serve exactly
the same namespaces, so this is Kopf's documented pattern syntax, kept here
rather than imported from Kopf's private modules (any Kopf release may move them):

- a pattern is a comma-separated list of globs (spaces around them ignored);
- a glob has `*` (any characters) and `?` (one character) placeholders;
- a glob starting with `!` excludes; if the first glob excludes, a `*` before
  it is implied;
- globs apply left to right: the first inclusive glob makes the initial match,
  an exclusion removes a match, and a later inclusive glob only brings back a
  namespace that the first glob matched (it never adds a new one).

So `myapp-*, !*-pr-*, *pr-123` serves `myapp-live` and `myapp-pr-123`, but
neither `myapp-pr-456` nor `otherapp-pr-123`.

No imports of ours: the lowest layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

__all__ = ["match_namespace", "namespace_matcher"]


def match_namespace(name: str, pattern: str) -> bool:
    """Whether the namespace `name` matches one `--namespace` pattern (Kopf's semantics)."""
    globs = [glob.strip() for glob in pattern.split(",")]
    if globs[0].startswith("!"):
        globs.insert(0, "*")
    # Case-sensitive on every platform (Kopf's fnmatch is, on the Linux it runs on).
    first_match = fnmatchcase(name, globs[0])
    matches = first_match
    for glob in globs[1:]:
        if glob.startswith("!"):
            matches = matches and not fnmatchcase(name, glob.lstrip("!"))
        else:
            matches = matches or (first_match and fnmatchcase(name, glob))
    return matches


def namespace_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A namespace is served if any pattern matches it; no patterns: every namespace is."""
    if not patterns:
        return lambda _: True
    return lambda namespace: any(match_namespace(namespace, pattern) for pattern in patterns)
