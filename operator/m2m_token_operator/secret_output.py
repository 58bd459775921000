"""The Secret a workload mounts: how it looks, who owns it, when it is written.

The rules that protect users live here as plain functions: a Secret is only
ever created, replaced or deleted when it carries this TokenRequest's
controller owner reference; a Secret whose content would not change is not
written; and a token read back from an owned Secret can seed the cache after a
restart, so a restart costs no call to the token endpoint.
"""

from __future__ import annotations

import base64
import enum
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from m2m_token_operator.kube import API_VERSION, KIND, Conflict, JsonObject, KubeApi, NotFound
from m2m_token_operator.tokens import AccessToken

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "m2m-token-operator"
TOKEN_REQUEST_LABEL = "m2m.dev/token-request"
EXPIRES_AT_ANNOTATION = "m2m.dev/expires-at"
# Not in the contract's list but harmless to users: the issue time lets a
# restarted operator compute the same refresh point without calling the endpoint.
ISSUED_AT_ANNOTATION = "m2m.dev/issued-at"
# An HMAC keyed by the client secret over identity, scope, token and times (CacheKey.seal):
# after a restart the token is reused only if it verifies, so an edited or planted token,
# or one issued to another identity, is never served.
SEAL_ANNOTATION = "m2m.dev/seal"

TOKEN_KEY = "token"
TOKEN_TYPE_KEY = "token-type"
EXPIRES_AT_KEY = "expires-at"
SCOPE_KEY = "scope"


@dataclass(frozen=True)
class Owner:
    """The TokenRequest a Secret belongs to."""

    namespace: str
    name: str
    uid: str


class WriteOutcome(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    CONFLICT = "conflict"  # a Secret of that name exists and is not ours: left exactly as it was
    # The Secret changed between the look's read and the replace (HTTP 409): it still holds
    # what was read, not the new content. Written again on the next look.
    RACED = "raced"


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, to the second, as Kubernetes prints times."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """An RFC 3339 time in UTC; one without an offset (say, hand-edited) is taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)  # not the process's local time zone
    return moment.astimezone(UTC)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def owner_reference(owner: Owner) -> JsonObject:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def secret_labels(owner: Owner) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY_VALUE, TOKEN_REQUEST_LABEL: owner.name}


def secret_data(*, scope: str, token: AccessToken) -> dict[str, str]:
    """The Secret's keys, base64-encoded as the API stores them."""
    return {
        TOKEN_KEY: _b64(token.value),
        TOKEN_TYPE_KEY: _b64(token.token_type),
        EXPIRES_AT_KEY: _b64(format_time(token.expires_at)),
        SCOPE_KEY: _b64(scope),
    }


def render_secret(
    *, owner: Owner, secret_name: str, scope: str, token: AccessToken, seal: str
) -> JsonObject:
    """The Secret exactly as the API contract describes it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": owner.namespace,
            "labels": secret_labels(owner),
            "annotations": {
                EXPIRES_AT_ANNOTATION: format_time(token.expires_at),
                ISSUED_AT_ANNOTATION: format_time(token.issued_at),
                SEAL_ANNOTATION: seal,
            },
            "ownerReferences": [owner_reference(owner)],
        },
        "data": secret_data(scope=scope, token=token),
    }


def is_owned_by(secret: Mapping[str, Any], owner_uid: str) -> bool:
    references = secret.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid and ref.get("controller") for ref in references)


def _differs(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """True when the live Secret lacks anything the desired one says (extra keys count too)."""
    live_meta = existing.get("metadata", {})
    want_meta = desired["metadata"]
    if existing.get("type", "Opaque") != desired["type"]:
        return True
    if (existing.get("data") or {}) != desired["data"]:
        return True
    live_labels = live_meta.get("labels") or {}
    live_annotations = live_meta.get("annotations") or {}
    if any(live_labels.get(k) != v for k, v in want_meta["labels"].items()):
        return True
    if any(live_annotations.get(k) != v for k, v in want_meta["annotations"].items()):
        return True
    return not is_owned_by(existing, want_meta["ownerReferences"][0]["uid"])


def merge_for_replace(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> JsonObject:
    """Desired content on top of the live object, keeping labels and annotations others added."""
    live_meta = existing.get("metadata", {})
    metadata = dict(desired["metadata"])
    metadata["labels"] = {**(live_meta.get("labels") or {}), **desired["metadata"]["labels"]}
    metadata["annotations"] = {
        **(live_meta.get("annotations") or {}),
        **desired["metadata"]["annotations"],
    }
    metadata["resourceVersion"] = live_meta.get("resourceVersion")
    return {**desired, "metadata": metadata}


async def write_secret(
    kube: KubeApi,
    *,
    desired: Mapping[str, Any],
    owner_uid: str,
    existing: Mapping[str, Any] | None,
) -> WriteOutcome:
    """Create or repair the Secret; never touch one this TokenRequest does not own.

    `existing` is the Secret as read earlier in the same look (None: it did not exist);
    a change since then makes the create or the guarded replace fail, never overwrite.
    """
    namespace = desired["metadata"]["namespace"]
    if existing is None:
        try:
            await kube.create_secret(namespace, desired)
        except Conflict:
            # Someone created it between our read and our create; look again next time.
            return WriteOutcome.CONFLICT
        return WriteOutcome.CREATED
    if not is_owned_by(existing, owner_uid):
        return WriteOutcome.CONFLICT
    if not _differs(existing, desired):
        return WriteOutcome.UNCHANGED
    try:
        await kube.replace_secret(namespace, merge_for_replace(existing, desired))
    except Conflict:
        # It changed under us: our content is not in it. Not "unchanged": the caller must
        # neither report the new token as delivered nor wait for its refresh point.
        return WriteOutcome.RACED
    except NotFound:
        # Deleted since the look's read (say, by a person): create it again at once.
        try:
            await kube.create_secret(namespace, desired)
        except Conflict:
            return WriteOutcome.RACED  # and created again by someone: look again soon
        return WriteOutcome.CREATED
    return WriteOutcome.UPDATED


async def delete_other_owned_secrets(kube: KubeApi, *, owner: Owner, keep: str) -> list[str]:
    """Delete the Secrets this TokenRequest owns under another name than `keep` (left by a
    spec.secretName change, also one made while the operator was down); their names."""
    selector = f"{TOKEN_REQUEST_LABEL}={owner.name}"
    deleted: list[str] = []
    for secret in await kube.list_secrets(owner.namespace, label_selector=selector):
        metadata = secret.get("metadata", {})
        name = str(metadata.get("name", ""))
        if name and name != keep and is_owned_by(secret, owner.uid):
            await kube.delete_secret(owner.namespace, name, uid=metadata["uid"])
            deleted.append(name)
    return deleted


def token_from_secret(
    secret: Mapping[str, Any],
    *,
    owner_uid: str,
    scope: str,
    now: datetime,
    seal_for: Callable[[AccessToken], str] | None,
) -> AccessToken | None:
    """The token in an owned Secret, if it is for this scope and not yet expired.

    With `seal_for`, only a token whose seal annotation is `seal_for(token)`: one this
    operator wrote for that identity and that nobody edited since (a Secret without a
    seal, written before seals existed, is not reused either).
    """
    if not is_owned_by(secret, owner_uid):
        return None
    data = secret.get("data") or {}
    annotations = secret.get("metadata", {}).get("annotations") or {}
    try:
        if _unb64(data[SCOPE_KEY]) != scope:
            return None
        value = _unb64(data[TOKEN_KEY])
        token_type = _unb64(data.get(TOKEN_TYPE_KEY, _b64("Bearer")))
        expires_at = parse_time(_unb64(data[EXPIRES_AT_KEY]))
        issued_text = annotations.get(ISSUED_AT_ANNOTATION)
        issued_at = parse_time(issued_text) if issued_text else min(now, expires_at)
    except (KeyError, ValueError):
        return None
    if not value or expires_at <= now or issued_at >= expires_at:
        return None
    token = AccessToken(
        value=value, token_type=token_type, issued_at=issued_at, expires_at=expires_at
    )
    if seal_for is not None:
        seal = str(annotations.get(SEAL_ANNOTATION) or "")
        if not hmac.compare_digest(seal.encode(), seal_for(token).encode()):
            return None
    return token
