"""Which Secrets reach the operator: only its own, and credentials Secrets that opt in.

Why not Kopf: Kopf filters `labels=`/`when=` on the client, so watching
`v1/secrets` through it means the API server sends, and Kopf keeps, every
Secret in the cluster (2,000 Helm-release-sized Secrets took the process to
532 MiB). Here two `LabelSelectedWatch`es pass their selector to the API
server, so other Secrets never enter the process:

- **owned Secrets** (`app.kubernetes.io/managed-by=m2m-token-operator`): drift
  and deletion of a TokenRequest's Secret wake that TokenRequest at once; the
  label is only a pre-filter (anyone who can create a Secret can set it), so
  `OwnedSecrets` keeps a Secret only if its controller owner reference is a
  TokenRequest;
- **credentials Secrets that carry `m2m.dev/credentials=true`**: their
  rotation, or their late creation, wakes the TokenRequests that name them.
  Several edits in quick succession cause one look (`Debouncer`).

Both watches are metadata-only (`PartialObjectMetadata`): a labelled Secret of
1 MiB that is not ours costs its metadata, never its data. A look reads the
data of a Secret when it needs it: the credentials at each token request, an
owned Secret's token to seed a key after a start (one Secret per key), or an
owned Secret that changed since the operator last wrote or read it.

Credentials Secrets without that label are not watched: they are read when a
token is needed (every refresh), and one that is missing or broken is looked
at again on the retry schedule (backoff from 5 s up to 5 min, and at once on
any change of the TokenRequest). docs/operations.md has the trade-off.

With `--namespace`, plain namespace names get one watch each (so a
RoleBinding per namespace is enough); any glob makes it one cluster-wide watch
whose events are filtered by namespace here (the selector still keeps other
people's Secrets out; RBAC then needs cluster-wide list/watch on Secrets).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import kubernetes

from m2m_token_operator.api.constants import (
    CREDENTIALS_LABEL,
    KEY_ID_ANNOTATION,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
)
from m2m_token_operator.api.secret_layout import (
    EXPIRES_AT_KEY,
    SCOPE_KEY,
    TOKEN_KEY,
    TOKEN_TYPE_KEY,
    token_request_owner,
)
from m2m_token_operator.kube.kube_api import SECRET_FIELD_MANAGER
from m2m_token_operator.kube.namespace_match import namespace_matcher
from m2m_token_operator.kube.reflector import DELETED, LabelSelectedWatch

logger = logging.getLogger(__name__)

OWNED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"
CREDENTIALS_SELECTOR = f"{CREDENTIALS_LABEL}=true"
# Set by the console script from --namespace flags (one per line); unset: all namespaces.
SERVED_NAMESPACES_ENV = "M2M_SERVED_NAMESPACES"
# Quiet period after a credentials Secret's change, and the longest a change waits.
DEBOUNCE_SECONDS = 1.0
DEBOUNCE_MAX_SECONDS = 2.0
# Owned-Secrets list pages: metadata only, but annotations may hold up to 256 KiB each.
OWNED_PAGE_SIZE = 100
# The data of an owned Secret is remembered only in the operator's shape and size.
_DATA_KEYS = frozenset((TOKEN_KEY, TOKEN_TYPE_KEY, EXPIRES_AT_KEY, SCOPE_KEY))
MAX_REMEMBERED_DATA = 64 * 1024

SecretSink = Callable[[Mapping[str, Any], bool], None]  # (secret, deleted)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Debouncer(Generic[K, V]):
    """Per key, call `fire(key, latest value)` once changes stop for `delay` seconds.

    A key that keeps changing is still fired `max_delay` seconds after its first
    unfired change, so a loop of edits gets one look per `max_delay`, not one per
    edit, and never none. Runs on the event loop (its clock: the loop's time).
    """

    def __init__(
        self,
        fire: Callable[[K, V], None],
        *,
        delay: float = DEBOUNCE_SECONDS,
        max_delay: float = DEBOUNCE_MAX_SECONDS,
    ) -> None:
        self._fire = fire
        self._delay = delay
        self._max_delay = max(delay, max_delay)
        self._pending: dict[K, tuple[float, V, asyncio.TimerHandle]] = {}

    def push(self, key: K, value: V) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._pending.get(key)
        first = now if pending is None else pending[0]
        if pending is not None:
            pending[2].cancel()
        at = min(now + self._delay, first + self._max_delay)
        handle = loop.call_at(at, self._due, key)
        self._pending[key] = (first, value, handle)

    def _due(self, key: K) -> None:
        _, value, _ = self._pending.pop(key)
        self._fire(key, value)

    def cancel(self) -> None:
        for _, _, handle in self._pending.values():
            handle.cancel()
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


def served_namespaces(environ: Mapping[str, str]) -> list[str]:
    """The --namespace patterns the operator runs with; [] means all namespaces."""
    raw = environ.get(SERVED_NAMESPACES_ENV, "")
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[!,")


class OwnedSecrets:
    """The owned Secrets' metadata as their watch last showed it: a look's read without a call.

    A Secret is kept only if its controller owner reference is a TokenRequest: the
    label is a pre-filter that anyone who can create a Secret can pass. The watch is
    metadata-only, so no Secret's data enters the process through it; what a look needs
    (expiry, issue time, seal, key id) is in the annotations. The data of a Secret is
    known only where the reconciler read or wrote it (`remember`), and only for the
    resourceVersion it had then: a later version may have been edited, and is read.

    Usable (`ready()`) once every owned-Secrets watch has finished its first list. It
    cannot show a Secret without our label (someone else's, or ours with the label
    removed), and it may lag a moment behind the API server: the reconciler treats an
    answer from here as a guess that a refused create or replace (409) corrects with a
    read. Its size follows the TokenRequests, never the rest of the cluster.
    """

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        # (resourceVersion, data) of the Secrets whose data a look read or wrote; None: it
        # was not of the operator's shape (kept out of memory, and read again when needed).
        self._data: dict[tuple[str, str], tuple[str, dict[str, str] | None]] = {}
        self._by_key_id: dict[str, set[tuple[str, str]]] = {}
        # Secrets whose managedFields give a part of `data` to another manager than ours.
        self._data_edited: set[tuple[str, str]] = set()
        self._synced: list[asyncio.Event] = []
        self._all_synced = False  # once every watch has listed; asked by every look

    def track(self, synced: asyncio.Event) -> None:
        """One more watch feeds this store (`synced`: set after its first list); `ready()`
        waits for that list too."""
        self._synced.append(synced)
        self._all_synced = False

    def ready(self) -> bool:
        if not self._all_synced:
            # A watch's `synced` stays set once its first list is in: ready stays true.
            self._all_synced = bool(self._synced) and all(s.is_set() for s in self._synced)
        return self._all_synced

    async def wait_ready(self) -> None:
        """Until every watch has finished its first list (the caller bounds the wait)."""
        for synced in self._synced:
            await synced.wait()

    def record(self, kind: str, secret: Mapping[str, Any]) -> bool:
        """Take a watch event in; whether the Secret is (still) ours."""
        metadata = secret.get("metadata") or {}
        key = (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))
        if kind == DELETED or token_request_owner(metadata) is None:
            # Gone, or not (any more) controlled by a TokenRequest: not ours.
            self._forget(key)
            return False
        self._unindex(key)
        compact = _compact(secret)
        self._objects[key] = compact
        if _data_managed_by_others(metadata):
            self._data_edited.add(key)
        else:
            self._data_edited.discard(key)
        key_id = (compact["metadata"].get("annotations") or {}).get(KEY_ID_ANNOTATION)
        if isinstance(key_id, str):
            self._by_key_id.setdefault(key_id, set()).add(key)
        return True

    def remember(self, secret: Mapping[str, Any]) -> None:
        """A look read or wrote this Secret: its data, as of its resourceVersion.

        Kept only in the shape the operator writes (its four keys, of a token's size),
        so that an edited Secret cannot make the process hold what it put there; of
        another shape, only that it was seen at that version.
        """
        metadata = secret.get("metadata") or {}
        key = (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))
        version = str(metadata.get("resourceVersion") or "")
        data = secret.get("data")
        if (
            isinstance(data, Mapping)
            and set(data) == _DATA_KEYS
            and sum(len(str(v)) for v in data.values()) <= MAX_REMEMBERED_DATA
        ):
            self._data[key] = (sys.intern(version), _shared(data))
        else:
            self._data[key] = (version, None)

    def changed(self, namespace: str, name: str, version: str) -> None:
        """The Secret changed to a version no look read or wrote: the next look reads it
        (never infers its data from its seal: an edit may have left the seal in place)."""
        if self.data_at(namespace, name, version) is None:
            self._data[(namespace, name)] = (version, None)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret as last seen (not to be modified), or None if the watch has none.

        With `data` only if a look read or wrote that very version of it; without, its
        data is not known here (read it, or infer it from its seal).
        """
        key = (namespace, name)
        kept = self._objects.get(key)
        if kept is None:
            return None
        data = self.data_at(namespace, name, str(kept["metadata"].get("resourceVersion") or ""))
        return kept if data is None else {**kept, "data": data}

    def data_seen(self, namespace: str, name: str) -> bool:
        """Whether a look read or wrote this Secret (any version) since it was last created."""
        return (namespace, name) in self._data

    def data_edited(self, namespace: str, name: str) -> bool:
        """Whether the Secret's managedFields say someone else set a part of its data: then
        its seal annotation is no proof of what its data holds (an edit keeps it)."""
        return (namespace, name) in self._data_edited

    def seen_at(self, namespace: str, name: str, version: str) -> bool:
        """Whether a look read or wrote this Secret at `version` (or a watch event at it
        already woke the look that reads it)."""
        known = self._data.get((namespace, name))
        return known is not None and known[0] == version

    def data_at(self, namespace: str, name: str, version: str) -> dict[str, str] | None:
        """The Secret's data if a look read or wrote it at `version`."""
        known = self._data.get((namespace, name))
        return known[1] if known is not None and known[0] == version else None

    def with_key_id(self, key_id: str) -> list[dict[str, Any]]:
        """The owned Secrets whose key-id annotation is `key_id` (as `get` shows them)."""
        found = []
        for namespace, name in sorted(self._by_key_id.get(key_id, ())):
            secret = self.get(namespace, name)
            if secret is not None:
                found.append(secret)
        return found

    def _unindex(self, key: tuple[str, str]) -> None:
        previous = self._objects.get(key)
        if previous is None:
            return
        key_id = (previous["metadata"].get("annotations") or {}).get(KEY_ID_ANNOTATION)
        if not isinstance(key_id, str) or key_id not in self._by_key_id:
            return
        holders = self._by_key_id[key_id]
        holders.discard(key)
        if not holders:
            del self._by_key_id[key_id]

    def _forget(self, key: tuple[str, str]) -> None:
        self._unindex(key)
        self._objects.pop(key, None)
        self._data.pop(key, None)
        self._data_edited.discard(key)

    def __len__(self) -> int:
        return len(self._objects)


@dataclass
class SecretFeed:
    """Turns watch events into the reconciler's `secret_changed(secret, deleted=...)`."""

    sink: SecretSink
    serves: Callable[[str], bool]
    debouncer: Debouncer[tuple[str, str], tuple[Mapping[str, Any], bool]] | None = None
    store: OwnedSecrets | None = None

    def __post_init__(self) -> None:
        if self.debouncer is None:
            self.debouncer = Debouncer(self._deliver_debounced)

    def owned(self, kind: str, obj: dict[str, Any]) -> None:
        namespace = _namespace(obj)
        if self.serves(namespace):
            name = (obj.get("metadata") or {}).get("name")
            logger.debug("Owned Secret %s/%s: %s", namespace, name, kind)
            if self.store is not None:
                self.store.record(kind, obj)  # before the sink: a look it wakes reads this
            self.sink(_plain(obj), kind == DELETED)

    def credentials(self, kind: str, obj: dict[str, Any]) -> None:
        if not self.serves(_namespace(obj)):
            return
        assert self.debouncer is not None
        metadata = obj.get("metadata") or {}
        self.debouncer.push(
            (_namespace(obj), str(metadata.get("name") or "")), (obj, kind == DELETED)
        )

    def close(self) -> None:
        """Drop debounced looks not yet taken (the operator stops)."""
        if self.debouncer is not None:
            self.debouncer.cancel()

    def _deliver_debounced(
        self, _: tuple[str, str], latest: tuple[Mapping[str, Any], bool]
    ) -> None:
        obj, deleted = latest
        self.sink(_plain(obj), deleted)


def _compact(secret: Mapping[str, Any]) -> dict[str, Any]:
    """What a look reads of an owned Secret's metadata, sharing the strings Secrets repeat.

    The TokenRequests of one identity and scope hold the same seal, key id and times,
    so their annotations are one string each in memory; the metadata a look does not
    read (managedFields, timestamps) is dropped.
    """
    metadata = secret.get("metadata") or {}
    kept: dict[str, Any] = {
        key: sys.intern(value)
        for key in _METADATA_KEPT
        if isinstance(value := metadata.get(key), str)
    }
    for key in ("labels", "annotations"):
        if key in metadata:
            kept[key] = _shared(metadata[key] or {})
    if "ownerReferences" in metadata:
        kept["ownerReferences"] = [_shared(ref) for ref in metadata["ownerReferences"] or []]
    return {"metadata": kept}


_METADATA_KEPT = ("name", "namespace", "uid", "resourceVersion")


def _data_managed_by_others(metadata: Mapping[str, Any]) -> bool:
    """Whether a field manager other than the operator owns a part of the Secret's data.

    The API server gives a field to whoever last changed it (and takes it from the
    others), so after the operator's write the data is all its own, and any edit of
    it since (kubectl edit or patch, a script) shows as another manager's `f:data`.
    Secrets written before the operator named its field manager count as edited.
    """
    for entry in metadata.get("managedFields") or []:
        if not isinstance(entry, Mapping) or entry.get("manager") == SECRET_FIELD_MANAGER:
            continue
        fields = entry.get("fieldsV1")
        if isinstance(fields, Mapping) and fields.get("f:data"):
            return True
    return False


def _shared(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        sys.intern(key): sys.intern(value) if isinstance(value, str) else value
        for key, value in values.items()
    }


def _namespace(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "")


def _plain(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What `secret_changed` reads: metadata, and data where the event has any (the owned
    Secrets' watch is metadata-only: none)."""
    plain: dict[str, Any] = {"metadata": dict(obj.get("metadata") or {})}
    if "data" in obj:
        plain["data"] = dict(obj.get("data") or {})
    return plain


def secret_watches(
    api_client: kubernetes.client.ApiClient, feed: SecretFeed, *, namespaces: Sequence[str]
) -> list[LabelSelectedWatch]:
    """The watches to run: owned and opted-in credentials Secrets, per namespace or all."""
    core = kubernetes.client.CoreV1Api(api_client)
    listers: list[tuple[str, Callable[..., Any]]]
    if namespaces and not any(_is_glob(p) for p in namespaces):
        listers = [
            (namespace, functools.partial(core.list_namespaced_secret, namespace))
            for namespace in namespaces
        ]
    else:
        listers = [("all", core.list_secret_for_all_namespaces)]
    watches: list[LabelSelectedWatch] = []
    for where, lister in listers:
        owned = LabelSelectedWatch(
            name=f"owned-secrets/{where}",
            lister=lister,
            label_selector=OWNED_SELECTOR,
            on_event=feed.owned,
            page_size=OWNED_PAGE_SIZE,
            metadata_only=True,  # a labelled Secret that is not ours costs its metadata only
        )
        if feed.store is not None:
            feed.store.track(owned.synced)
        watches.append(owned)
        watches.append(
            LabelSelectedWatch(
                name=f"credentials-secrets/{where}",
                lister=lister,
                label_selector=CREDENTIALS_SELECTOR,
                on_event=feed.credentials,
                page_size=OWNED_PAGE_SIZE,
                # Only wakes the TokenRequests naming it; a look reads the credentials.
                metadata_only=True,
            )
        )
    return watches


def build(
    api_client: kubernetes.client.ApiClient,
    sink: SecretSink,
    *,
    environ: Mapping[str, str],
    store: OwnedSecrets | None = None,
) -> tuple[SecretFeed, list[LabelSelectedWatch]]:
    """The feed and the watches for the namespaces served; run each watch as a task."""
    namespaces = served_namespaces(environ)
    feed = SecretFeed(sink=sink, serves=namespace_matcher(namespaces), store=store)
    logger.info(
        "Watching owned Secrets (%s) and opted-in credentials Secrets (%s) in %s",
        OWNED_SELECTOR,
        CREDENTIALS_SELECTOR,
        ", ".join(namespaces) or "all namespaces",
    )
    return feed, secret_watches(api_client, feed, namespaces=namespaces)
