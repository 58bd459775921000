"""The Secret a TokenRequest writes, as the contract names it: its keys, and what makes it ours.

Shared by the code that writes the Secret (`reconcile/secret_output.py`) and the watch that
selects it (`kube/secret_watches.py`), which must not depend on the writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from m2m_token_operator.api.constants import GROUP, KIND

TOKEN_KEY = "token"
TOKEN_TYPE_KEY = "token-type"
EXPIRES_AT_KEY = "expires-at"
SCOPE_KEY = "scope"


def token_request_owner(metadata: Mapping[str, Any]) -> str | None:
    """The uid of the TokenRequest that controls an object with this metadata, if any.

    What makes a Secret ours: anyone who can create a Secret can put our label on it,
    but only the garbage collector's rules tie a controller reference to a TokenRequest.
    """
    for ref in metadata.get("ownerReferences") or []:
        if (
            isinstance(ref, Mapping)
            and ref.get("controller")
            and ref.get("kind") == KIND
            and str(ref.get("apiVersion") or "").split("/")[0] == GROUP
            and ref.get("uid")
        ):
            return str(ref["uid"])
    return None
