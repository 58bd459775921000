"""The syntax of Kubernetes names: DNS labels and DNS subdomains (RFC 1123).

Patterns without anchors, so that they can be part of a larger pattern; use
`fullmatch`, or the predicates, which also check the length. No imports of
ours: the lowest layer.
"""

from __future__ import annotations

import re

# A namespace's name, a label: at most 63 lowercase letters, digits and '-', alphanumeric
# at both ends.
DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
MAX_DNS_LABEL_LENGTH = 63
# Most objects' names (a Secret's), a label key's prefix: DNS labels joined by '.', at most 253.
DNS_SUBDOMAIN = rf"{DNS_LABEL}(?:\.{DNS_LABEL})*"
MAX_DNS_SUBDOMAIN_LENGTH = 253

_DNS_LABEL = re.compile(DNS_LABEL)
_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN)


def is_dns_label(name: str) -> bool:
    return len(name) <= MAX_DNS_LABEL_LENGTH and _DNS_LABEL.fullmatch(name) is not None


def is_dns_subdomain(name: str) -> bool:
    return len(name) <= MAX_DNS_SUBDOMAIN_LENGTH and _DNS_SUBDOMAIN.fullmatch(name) is not None
