"""The TokenRequests this replica knows, and who to wake when something changes.

A subscription is what the operator remembers about one TokenRequest between
two looks at it: its parsed spec, the status it last wrote, the cache key it
uses, and its failure counters. Three reverse indexes answer the questions
that events ask: which TokenRequests share a token (by cache key), which one
names a Secret (drift, deletion), and which ones read a credentials Secret
(recovery when it appears). Kept apart from the reconciler so that the
bookkeeping (uid replacement, index cleanup) is plain code with plain tests.

`@kopf.index` was considered: it indexes Kopf's own watch events only, while
the key index changes with each look (credentials are read during the look),
so one in-process registry keeps all three in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from m2m_token_operator.api.constants import JsonObject
from m2m_token_operator.api.refresh_annotation import pending_request
from m2m_token_operator.api.spec import SpecError, TokenRequestSpec, parse_spec
from m2m_token_operator.reconcile.secret_output import Owner
from m2m_token_operator.tokens.cache import CacheKey

logger = logging.getLogger(__name__)

ObjectRef = tuple[str, str]  # (namespace, name)


@dataclass
class Subscription:
    """What the operator knows about one TokenRequest between two looks at it."""

    namespace: str
    name: str
    uid: str
    generation: int
    spec: TokenRequestSpec | None
    spec_error: str | None
    status: JsonObject  # the status as last read or written
    key: CacheKey | None = None
    credentials_failures: int = 0  # consecutive looks ended by unusable credentials
    conflicts: int = 0  # consecutive looks that found a foreign Secret under secretName
    api_failures: int = 0  # consecutive looks ended by a Kubernetes API error
    # Owned Secrets under an old spec.secretName may remain: delete once the new one is written.
    cleanup_pending: bool = False
    # Another replica served the object while this one was paused: re-read before acting.
    stale: bool = False
    # metadata.deletionTimestamp is set: the object is going away and is served no more.
    deleting: bool = False
    # An m2m.dev/refresh value not handled yet (refresh.recorded_value form): force a fetch.
    refresh_request: str | None = None
    # This version of the object has had a look that ended (logged once, as a sign of it).
    looked: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def ref(self) -> ObjectRef:
        return (self.namespace, self.name)

    @property
    def owner(self) -> Owner:
        return Owner(namespace=self.namespace, name=self.name, uid=self.uid)

    @property
    def log_context(self) -> str:
        scope = self.spec.scope if self.spec else "-"
        return f"tokenrequest={self.namespace}/{self.name} scope={scope}"


class Registry:
    """Subscriptions by name, and the three reverse indexes kept in step with them."""

    def __init__(
        self,
        *,
        default_cluster: str,
        on_key_unused: Callable[[CacheKey], None],
        on_key_left: Callable[[CacheKey, ObjectRef], None] | None = None,
    ) -> None:
        self._default_cluster = default_cluster
        self._on_key_unused = on_key_unused  # the cache forgets a token nobody needs
        # The cache drops this subscriber's refresh_before from the key's shared point.
        self._on_key_left = on_key_left
        self._subscriptions: dict[ObjectRef, Subscription] = {}
        self._by_key: defaultdict[CacheKey, set[ObjectRef]] = defaultdict(set)
        self._by_credentials: defaultdict[ObjectRef, set[ObjectRef]] = defaultdict(set)
        # A set: two TokenRequests may name one Secret (one owns it, the other is in conflict).
        self._by_secret: defaultdict[ObjectRef, set[ObjectRef]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._subscriptions.values()))

    def get(self, ref: ObjectRef) -> Subscription | None:
        return self._subscriptions.get(ref)

    def current(self, subscription: Subscription) -> bool:
        """Still the object's latest version (not deleted or replaced during an await)."""
        return self._subscriptions.get(subscription.ref) is subscription

    def learn(self, body: Mapping[str, Any]) -> tuple[Subscription, bool]:
        """(Re)learn a TokenRequest from its body; True when it replaced another uid."""
        metadata = body.get("metadata", {})
        namespace, name = metadata["namespace"], metadata["name"]
        spec: TokenRequestSpec | None = None
        spec_error: str | None = None
        try:
            spec = parse_spec(
                body.get("spec") or {},
                name=name,
                namespace=namespace,
                default_cluster=self._default_cluster,
            )
        except SpecError as error:
            spec_error = str(error)
        previous = self._subscriptions.get((namespace, name))
        replaced = previous is not None and previous.uid != metadata["uid"]
        if previous is not None and replaced:
            # Deleted and created again under the same name: nothing carries over but the
            # lock, which keeps looks at one name one at a time.
            self._unindex(previous)
            previous = dataclasses.replace(
                previous, key=None, status=dict(body.get("status") or {})
            )
        stale = previous is not None and previous.stale
        status = dict(body.get("status") or {})
        subscription = Subscription(
            namespace=namespace,
            name=name,
            uid=metadata["uid"],
            generation=int(metadata.get("generation") or 0),
            spec=spec,
            spec_error=spec_error,
            # After a pause the body is newer than what this replica remembers.
            status=status if previous is None or stale else previous.status,
            stale=stale,
            deleting=bool(metadata.get("deletionTimestamp")),
        )
        # A value set while the operator was down is in the object itself.
        subscription.refresh_request = pending_request(
            metadata.get("annotations"), subscription.status
        ) or (previous.refresh_request if previous is not None and not replaced else None)
        delivered_to = subscription.status.get("secretName")
        subscription.cleanup_pending = bool(
            spec is not None and delivered_to and delivered_to != spec.secret_name
        )
        if previous is not None:
            subscription.cleanup_pending = subscription.cleanup_pending or previous.cleanup_pending
            subscription.lock = previous.lock
            subscription.key = previous.key
            # The key's membership carries over: dropping it here would forget a token
            # that the new version of the object still needs.
            self._unindex(previous, keep_key=True)
        self._subscriptions[subscription.ref] = subscription
        self._index(subscription)
        return subscription, replaced

    def forget(self, namespace: str, name: str, uid: str | None = None) -> Subscription | None:
        """Drop a TokenRequest (only that uid, when given); the subscription dropped, if any."""
        subscription = self._subscriptions.get((namespace, name))
        if subscription is None or (uid is not None and subscription.uid != uid):
            return None
        del self._subscriptions[(namespace, name)]
        self._unindex(subscription)
        return subscription

    def use_key(self, subscription: Subscription, key: CacheKey) -> None:
        """The subscription's token is now the one of `key` (a new identity or scope)."""
        if subscription.key is not None:
            self._drop_from_key(subscription.key, subscription.ref)
        subscription.key = key
        self._by_key[key].add(subscription.ref)

    def drop_key(self, subscription: Subscription) -> None:
        """Forget which token the subscription uses (re-learnt on its next look)."""
        if subscription.key is not None:
            self._drop_from_key(subscription.key, subscription.ref)
            subscription.key = None

    def sharing_key(self, key: CacheKey) -> set[ObjectRef]:
        return set(self._by_key.get(key, ()))

    def naming_secret(self, ref: ObjectRef) -> set[ObjectRef]:
        return set(self._by_secret.get(ref, ()))

    def reading_credentials(self, ref: ObjectRef) -> set[ObjectRef]:
        return set(self._by_credentials.get(ref, ()))

    def is_interesting_secret(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._by_credentials or (namespace, name) in self._by_secret

    # Index upkeep

    def _index(self, subscription: Subscription) -> None:
        ref = subscription.ref
        if subscription.key is not None:
            self._by_key[subscription.key].add(ref)
        if subscription.spec is not None:
            self._by_secret[(subscription.namespace, subscription.spec.secret_name)].add(ref)
            if subscription.spec.credentials_secret:
                credentials = (subscription.namespace, subscription.spec.credentials_secret)
                self._by_credentials[credentials].add(ref)

    def _unindex(self, subscription: Subscription, *, keep_key: bool = False) -> None:
        ref = subscription.ref
        if subscription.key is not None and not keep_key:
            self._drop_from_key(subscription.key, ref)
        if subscription.spec is None:
            return  # an invalid spec was never indexed by Secret names
        self._discard(self._by_secret, (subscription.namespace, subscription.spec.secret_name), ref)
        if subscription.spec.credentials_secret:
            credentials = (subscription.namespace, subscription.spec.credentials_secret)
            self._discard(self._by_credentials, credentials, ref)

    @staticmethod
    def _discard(
        index: defaultdict[ObjectRef, set[ObjectRef]], at: ObjectRef, ref: ObjectRef
    ) -> None:
        subscribers = index.get(at)
        if subscribers is not None:
            subscribers.discard(ref)
            if not subscribers:
                del index[at]

    def _drop_from_key(self, key: CacheKey, ref: ObjectRef) -> None:
        subscribers = self._by_key.get(key)
        if subscribers is None:
            return
        subscribers.discard(ref)
        if self._on_key_left is not None:
            self._on_key_left(key, ref)
        if not subscribers:
            del self._by_key[key]
            self._on_key_unused(key)  # nobody needs this token any more
