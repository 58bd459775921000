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
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from m2m_token_operator.api.constants import (
    API_VERSION,
    EXPIRES_AT_ANNOTATION,
    ISSUED_AT_ANNOTATION,
    KEY_ID_ANNOTATION,
    KIND,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    SEAL_ANNOTATION,
    TEMPLATE_KEYS_ANNOTATION,
    TOKEN_REQUEST_LABEL,
    JsonObject,
)
from m2m_token_operator.api.secret_layout import (
    EXPIRES_AT_KEY,
    SCOPE_KEY,
    TOKEN_KEY,
    TOKEN_TYPE_KEY,
)
from m2m_token_operator.api.spec import SecretTemplate
from m2m_token_operator.api.timefmt import format_time, parse_time
from m2m_token_operator.kube.kube_api import Conflict, KubeApi, NotFound
from m2m_token_operator.tokens.model import AccessToken


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


def template_keys(template: SecretTemplate) -> str:
    """The value of TEMPLATE_KEYS_ANNOTATION for `template`."""
    keys = {"labels": sorted(template.labels), "annotations": sorted(template.annotations)}
    return json.dumps(keys, separators=(",", ":"))


def templated_keys(secret: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """(labels, annotations) that the live Secret's template annotation says are templated.

    Unreadable (hand-edited) content counts as none: at worst a key the template
    dropped stays on the Secret; never is a key of someone else's removed.
    """
    annotations = secret.get("metadata", {}).get("annotations") or {}
    try:
        keys = json.loads(annotations.get(TEMPLATE_KEYS_ANNOTATION) or "{}")
    except ValueError:
        return set(), set()
    if not isinstance(keys, dict):
        return set(), set()

    def strings(value: object) -> set[str]:
        return {k for k in value if isinstance(k, str)} if isinstance(value, list) else set()

    return strings(keys.get("labels")), strings(keys.get("annotations"))


def render_secret(
    *,
    owner: Owner,
    secret_name: str,
    scope: str,
    token: AccessToken,
    seal: str,
    template: SecretTemplate | None = None,
    key_id: str | None = None,
) -> JsonObject:
    """The Secret exactly as the API contract describes it, plus spec.secretTemplate's keys.

    The operator's own labels and annotations win over the template's (the CRD
    and `models.parse_secret_template` reject those keys anyway).
    """
    template = template or SecretTemplate()
    annotations = {
        **template.annotations,
        EXPIRES_AT_ANNOTATION: format_time(token.expires_at),
        ISSUED_AT_ANNOTATION: format_time(token.issued_at),
        SEAL_ANNOTATION: seal,
    }
    if key_id is not None:
        annotations[KEY_ID_ANNOTATION] = key_id
    if template:
        annotations[TEMPLATE_KEYS_ANNOTATION] = template_keys(template)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": owner.namespace,
            "labels": {**template.labels, **secret_labels(owner)},
            "annotations": annotations,
            "ownerReferences": [owner_reference(owner)],
        },
        "data": secret_data(scope=scope, token=token),
    }


def _dropped_template_keys(
    existing: Mapping[str, Any], desired: Mapping[str, Any]
) -> tuple[set[str], set[str]]:
    """Labels and annotations the live Secret has from an earlier template, no longer wanted."""
    labels, annotations = templated_keys(existing)
    if TEMPLATE_KEYS_ANNOTATION not in desired["metadata"]["annotations"]:
        annotations.add(TEMPLATE_KEYS_ANNOTATION)  # no template any more: the record goes too
    return (
        labels - set(desired["metadata"]["labels"]),
        annotations - set(desired["metadata"]["annotations"]),
    )


def template_drifted(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether the live Secret's labels and annotations differ from what `desired` says:
    one missing or changed, or one an earlier template put there and the current drops."""
    live_meta = existing.get("metadata", {})
    want_meta = desired["metadata"]
    live_labels = live_meta.get("labels") or {}
    live_annotations = live_meta.get("annotations") or {}
    if any(live_labels.get(k) != v for k, v in want_meta["labels"].items()):
        return True
    if any(live_annotations.get(k) != v for k, v in want_meta["annotations"].items()):
        return True
    dropped_labels, dropped_annotations = _dropped_template_keys(existing, desired)
    return any(k in live_labels for k in dropped_labels) or any(
        k in live_annotations for k in dropped_annotations
    )


def is_owned_by(secret: Mapping[str, Any], owner_uid: str) -> bool:
    references = secret.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid and ref.get("controller") for ref in references)


def _differs(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """True when the live Secret lacks anything the desired one says (extra keys count too)."""
    want_meta = desired["metadata"]
    if existing.get("type", "Opaque") != desired["type"]:
        return True
    if (existing.get("data") or {}) != desired["data"]:
        return True
    # The key id alone is no reason to write: Secrets of older versions get it with
    # their next token, not all at once at an upgrade.
    annotations = {k: v for k, v in want_meta["annotations"].items() if k != KEY_ID_ANNOTATION}
    if template_drifted(existing, {"metadata": {**want_meta, "annotations": annotations}}):
        return True
    return not is_owned_by(existing, want_meta["ownerReferences"][0]["uid"])


def template_drifted_from(secret: Mapping[str, Any], template: SecretTemplate) -> bool:
    """Whether a live Secret misses or contradicts `template`, or keeps keys it dropped.

    For a watch event on the Secret: the template's part of `_differs`, without a
    token at hand (the reconciler's drift check wakes the TokenRequest on True).
    """
    annotations = dict(template.annotations)
    if template:
        annotations[TEMPLATE_KEYS_ANNOTATION] = template_keys(template)
    desired = {"metadata": {"labels": dict(template.labels), "annotations": annotations}}
    return template_drifted(secret, desired)


def merge_for_replace(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> JsonObject:
    """Desired content on top of the live object, keeping labels and annotations others added
    (but not those an earlier spec.secretTemplate put there and the current one drops)."""
    live_meta = existing.get("metadata", {})
    dropped_labels, dropped_annotations = _dropped_template_keys(existing, desired)
    live_labels = {
        k: v for k, v in (live_meta.get("labels") or {}).items() if k not in dropped_labels
    }
    live_annotations = {
        k: v
        for k, v in (live_meta.get("annotations") or {}).items()
        if k not in dropped_annotations
    }
    metadata = dict(desired["metadata"])
    metadata["labels"] = {**live_labels, **desired["metadata"]["labels"]}
    metadata["annotations"] = {**live_annotations, **desired["metadata"]["annotations"]}
    metadata["resourceVersion"] = live_meta.get("resourceVersion")
    return {**desired, "metadata": metadata}


async def write_secret(
    kube: KubeApi,
    *,
    desired: Mapping[str, Any],
    owner_uid: str,
    existing: Mapping[str, Any] | None,
    written: Callable[[Mapping[str, Any]], None] | None = None,
) -> WriteOutcome:
    """Create or repair the Secret; never touch one this TokenRequest does not own.

    `existing` is the Secret as read earlier in the same look (None: it did not exist);
    a change since then makes the create or the guarded replace fail, never overwrite.
    `written` is given the Secret as the API server stored it, after a create or replace.
    """
    namespace = desired["metadata"]["namespace"]

    def tell(stored: Mapping[str, Any]) -> None:
        if written is not None:
            written(stored)

    if existing is None:
        try:
            tell(await kube.create_secret(namespace, desired))
        except Conflict:
            # Someone created it between our read and our create; look again next time.
            return WriteOutcome.CONFLICT
        return WriteOutcome.CREATED
    if not is_owned_by(existing, owner_uid):
        return WriteOutcome.CONFLICT
    if not _differs(existing, desired):
        return WriteOutcome.UNCHANGED
    try:
        tell(await kube.replace_secret(namespace, merge_for_replace(existing, desired)))
    except Conflict:
        # It changed under us: our content is not in it. Not "unchanged": the caller must
        # neither report the new token as delivered nor wait for its refresh point.
        return WriteOutcome.RACED
    except NotFound:
        # Deleted since the look's read (say, by a person): create it again at once.
        try:
            tell(await kube.create_secret(namespace, desired))
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
