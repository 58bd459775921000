"""From a TokenRequest to a Secret holding a valid token, and back to its status.

One `TokenRequestReconciler` serves the whole operator: the handlers' entry
points, and the order of the steps of each look at a TokenRequest, as
cert-manager's controllers do:

- `Gatherer.gather`: the reads that find the facts (the Secret as read, the
  credentials or why they failed, the shared token cache's answer), and the
  Secret to write;
- `Writer.write_secret`: writes it; how that went (409: RACED) is a fact too;
- `decision.decide`: a pure function from those facts to an outcome (which
  token the Secret holds, the status, the events, when to look again);
- `Writer.apply`: status, events, metrics and the next wake-up, deciding
  nothing; the only caller of `Scheduler.reschedule`.

`Seeder` fills the token cache from owned Secrets after a start, and
`CredentialsReader` reads the client credentials. The TokenRequests it knows
live in a `Registry`. When a token is fetched, every other subscription of the
same key is woken at once, so one call to the token endpoint serves them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import random as _random
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from m2m_token_operator.api.constants import EXPIRES_AT_ANNOTATION, SEAL_ANNOTATION, JsonObject
from m2m_token_operator.api.secret_layout import token_request_owner
from m2m_token_operator.api.spec import TokenRequestSpec
from m2m_token_operator.api.timefmt import parse_time
from m2m_token_operator.config.settings import Settings
from m2m_token_operator.kube.call_priority import look_started
from m2m_token_operator.kube.federation import federated_identity
from m2m_token_operator.kube.kube_api import KubeApi, KubeError
from m2m_token_operator.kube.namespaces import OperatorIdentityNamespaces
from m2m_token_operator.kube.secret_watches import OwnedSecrets
from m2m_token_operator.reconcile import metrics
from m2m_token_operator.reconcile.decision import Facts, Outcome, decide, revised
from m2m_token_operator.reconcile.namespace_budget import NamespaceBudget
from m2m_token_operator.reconcile.registry import ObjectRef, Registry, Subscription
from m2m_token_operator.reconcile.scheduler import Scheduler
from m2m_token_operator.reconcile.seal import SealKey
from m2m_token_operator.reconcile.secret_output import (
    WriteOutcome,
    delete_other_owned_secrets,
    is_owned_by,
    render_secret,
    secret_data,
    secret_labels,
    template_drifted_from,
    token_from_secret,
    write_secret,
)
from m2m_token_operator.reconcile.status import event_body
from m2m_token_operator.tokens.cache import CacheKey, Holds, TokenCache
from m2m_token_operator.tokens.client import client_id_shown
from m2m_token_operator.tokens.credentials import (
    ClientCredentials,
    CredentialsError,
    credentials_from_secret,
    operator_identity,
    operator_token_endpoint,
)
from m2m_token_operator.tokens.model import AccessToken
from m2m_token_operator.tokens.redaction import REDACTOR
from m2m_token_operator.tokens.timing import RetryPolicy

logger = logging.getLogger(__name__)

__all__ = ["ObjectRef", "Subscription", "TokenRequestReconciler"]

# How long the first looks after a start wait for the owned-Secrets watch's first list, so
# that a key is seeded from whichever Secret holds its token before anyone fetches it.
OWNED_SECRETS_WAIT_SECONDS = 20.0
# Looks under way at once (each namespace at most M2M_NAMESPACE_CONCURRENCY of them).
# A look mostly waits: for the API server, for a fetch. With 16, a burst of new
# TokenRequests queued behind the looks while the API server had CPU to spare, and
# their create -> Ready grew with the queue: 64 took p99 from 2.2 s to 1.3-1.9 s (the
# floor's: 1.2 s) in the 1,000-TokenRequest burst of bench/scale_bench.py.
LOOK_CONCURRENCY = 64
# Secrets read (at most) to seed one key: the latest-expiring first; one normally does.
SEED_READS = 3


class _Superseded(Exception):
    """The object was deleted or replaced during the look: its facts speak for nobody."""


def _uses_operator_identity(spec: TokenRequestSpec) -> bool:
    return spec.credentials_secret is None and spec.credentials_service_account is None


@dataclass(frozen=True)
class SecretWrite:
    """The Secret a look is to write: rendered by `Gatherer`, written by `Writer`."""

    desired: JsonObject
    existing: Mapping[str, Any] | None  # what the look found under the name
    guessed: bool  # `existing` is the owned-Secrets watch's copy, not a read


class _Forget(Protocol):
    def __call__(
        self, namespace: str, name: str, uid: str | None = None, *, why: str | None = None
    ) -> None: ...


class TokenRequestReconciler:
    """The coordinator: the handlers' entry points, and each look's order of steps.

    Collaborators: `Gatherer` reads the facts (and renders the Secret), `Writer` writes
    (the Secret, the status, the events, the next wake-up), `Seeder` seeds the cache
    from owned Secrets, `CredentialsReader` reads credentials, `SecretEventsDuringLooks`
    holds the Secret events that come during a look."""

    def __init__(
        self,
        *,
        settings: Settings,
        kube: KubeApi,
        cache: TokenCache,
        clock: Callable[[], datetime],
        seal_key: SealKey,
        identity_namespaces: OperatorIdentityNamespaces,
        environ: Mapping[str, str] | None = None,
        random: Callable[[], float] = _random.random,
        owned_secrets: OwnedSecrets | None = None,
    ) -> None:
        self._kube = kube
        self._cache = cache
        self._clock = clock
        self._random = random
        self._owned_secrets = owned_secrets
        self._retry: RetryPolicy = settings.retry_policy()
        self.registry = Registry(
            default_cluster=settings.cluster_name,
            on_key_unused=cache.forget,
            on_key_left=cache.unsubscribe,
        )
        self.scheduler: Scheduler[ObjectRef] = Scheduler(
            clock=clock, handle=self._scheduled, concurrency=LOOK_CONCURRENCY
        )
        self._gatherer = Gatherer(
            settings=settings,
            kube=kube,
            cache=cache,
            clock=clock,
            seal_key=seal_key,
            identity_namespaces=identity_namespaces,
            registry=self.registry,
            credentials=CredentialsReader(settings=settings, kube=kube, environ=environ),
            seeder=Seeder(
                kube=kube, cache=cache, clock=clock, seal_key=seal_key, owned_secrets=owned_secrets
            ),
            fetched=self._fan_out,
            while_waiting=self.scheduler.slot_lent,
            random=random,
            owned_secrets=owned_secrets,
        )
        self._writer = Writer(
            kube=kube,
            clock=clock,
            registry=self.registry,
            scheduler=self.scheduler,
            forget=self.forget,
            owned_secrets=owned_secrets,
        )
        self._during_looks = SecretEventsDuringLooks()
        self._drifted = functools.partial(_secret_drifted, cache=cache, store=owned_secrets)

    # Entry points (called from the TokenRequest and Secret watches)

    def reconcile(self, body: Mapping[str, Any]) -> None:
        """Create, update or resume: (re)learn the TokenRequest; the scheduler looks at once.

        Never a look here: every look, whoever asks for it, is the scheduler's, so that
        the peering gate and the per-namespace budget apply to all of them.
        """
        subscription = self._learn(body)
        self.scheduler.schedule(subscription.ref, self._clock())

    def observed(self, body: Mapping[str, Any]) -> None:
        """A watch event or the initial listing: look again only if the spec is new to us.

        A new object (or one re-created under the same name) and a new
        metadata.generation (a spec change) bring a look at once; events that change
        neither (our own status writes, labels, annotations) cost nothing.
        """
        metadata = body.get("metadata", {})
        known = self.registry.get((metadata.get("namespace", ""), metadata.get("name", "")))
        if (
            known is not None
            and not known.stale
            and known.uid == metadata.get("uid")
            and known.generation == int(metadata.get("generation") or 0)
        ):
            return
        self.reconcile(body)

    def forget(
        self, namespace: str, name: str, uid: str | None = None, *, why: str | None = None
    ) -> None:
        """The TokenRequest is gone; its Secret goes with it through garbage collection.

        With `uid`, only that object: the DELETED event of an object deleted and created
        again under the same name may arrive after the new one was learnt. `why` says how
        the TokenRequest watch knew (kube/token_request_watch.py), when not from a deletion.
        """
        subscription = self.registry.forget(namespace, name, uid)
        if subscription is None:
            return
        self.scheduler.schedule(subscription.ref, None)
        metrics.forget_token_request(namespace, name)
        if why is None:
            why = "being deleted" if subscription.deleting else "deleted"
        logger.info("%s forgotten (%s)", subscription.log_context, why)

    def being_deleted(self, namespace: str, name: str, uid: str | None) -> None:
        """metadata.deletionTimestamp was set: stop serving it (its next look forgets it).

        Foreground deletion, or another controller's finalizer, keeps the object for a
        while; re-creating its Secret then would only fight the garbage collector.
        """
        subscription = self.registry.get((namespace, name))
        if subscription is None or subscription.uid != uid or subscription.deleting:
            return
        subscription.deleting = True
        self.scheduler.schedule(subscription.ref, self._clock())

    def secret_changed(self, secret: Mapping[str, Any], *, deleted: bool) -> None:
        """Any Secret event: drift of an owned Secret, or a credentials Secret (re)appearing."""
        metadata = secret.get("metadata", {})
        ref = (metadata.get("namespace", ""), metadata.get("name", ""))
        for subscriber in self.registry.reading_credentials(ref):
            self.scheduler.schedule(subscriber, self._clock())
        for named_by in self.registry.naming_secret(ref):
            subscription = self.registry.get(named_by)
            if subscription is None:
                continue
            if not deleted and subscription.lock.locked():
                self._during_looks.hold(named_by, ref, secret)  # judged when the look ends
            elif deleted or self._drifted(subscription, secret):
                self.scheduler.schedule(named_by, self._clock())

    def namespace_allowed_changed(self, namespace: str | None) -> None:
        """The namespace gained or lost the operator's identity: look at its users now.

        None: every namespace (the first list of granted namespaces has arrived).
        """
        now = self._clock()
        for subscription in self.registry:
            spec = subscription.spec
            if namespace not in (None, subscription.namespace):
                continue
            if spec is not None and _uses_operator_identity(spec):
                self.scheduler.schedule(subscription.ref, now)

    def refresh_requested(self, namespace: str, name: str, value: str) -> None:
        """A new m2m.dev/refresh value: fetch a new token at the next look, which is now."""
        subscription = self.registry.get((namespace, name))
        if subscription is None or subscription.refresh_request == value:
            return  # not learnt yet: learning finds the annotation in the object itself
        subscription.refresh_request = value
        self.scheduler.schedule(subscription.ref, self._clock())

    def paused(self) -> None:
        """Another replica serves now: nothing more from here, not even what is under way.

        The looks under way are cancelled (due again for the resume), the events not
        posted yet are dropped, and only the active replica speaks in metrics.
        """
        self.scheduler.pause()
        self._kube.drop_pending_events()
        for subscription in self.registry:
            metrics.forget_token_request(subscription.namespace, subscription.name)

    def resume_after_pause(self) -> None:
        """This replica takes over again: what it learnt before its pause may be stale.

        Meanwhile the active replica refreshed tokens (into the Secrets), changed
        statuses, and saw deletions that no watch will replay here. Every known
        TokenRequest is re-read before it is served again, and its token comes
        from its Secret where that is still good, as after a restart.
        """
        now = self._clock()
        for subscription in self.registry:
            subscription.stale = True
            self.registry.drop_key(subscription)
            self.scheduler.schedule(subscription.ref, now)
        logger.info("Resuming after a pause: %d TokenRequests to re-read", len(self.registry))

    def is_interesting_secret(self, namespace: str, name: str) -> bool:
        return self.registry.is_interesting_secret(namespace, name)

    # Subscriptions

    def _learn(self, body: Mapping[str, Any]) -> Subscription:
        subscription, replaced = self.registry.learn(body)
        if replaced:
            self.scheduler.schedule(subscription.ref, None)  # the old object's wake-up
        return subscription

    # One look: gather → write the Secret → decide → apply

    async def _scheduled(self, ref: ObjectRef) -> None:
        subscription = self.registry.get(ref)
        if subscription is not None:
            await self._look(subscription)

    async def _look(self, subscription: Subscription) -> None:
        try:
            with look_started():
                await self._look_now(subscription)
        finally:
            if self._during_looks.drifted(subscription.ref, self.registry, self._drifted):
                self.scheduler.schedule(subscription.ref, self._clock())

    async def _look_now(self, subscription: Subscription) -> None:
        async with subscription.lock:
            if not self.registry.current(subscription):
                return  # replaced by a newer version of the object, or deleted meanwhile
            try:
                if subscription.stale:
                    try:
                        await self._relearn(subscription)
                    except KubeError as error:
                        facts = self._gatherer.known_facts(subscription)
                        failed = revised(facts, api_error=error)
                        await self._writer.apply(subscription, decide(failed, self._clock()))
                    return
                facts, secret_write = await self._gatherer.gather(subscription)
                if secret_write is not None:
                    # Before the status: how the write went is a fact `decide` needs.
                    facts = await self._writer.write_secret(subscription, facts, secret_write)
                try:
                    await self._writer.apply(subscription, decide(facts, self._clock()))
                except KubeError as error:
                    # The status (or an old Secret's deletion) failed after the facts were
                    # in: the same facts with that error. What was fetched stays cached.
                    cache = facts.cache and dataclasses.replace(facts.cache, fetched=False)
                    retry = revised(facts, api_error=error, cache=cache)
                    await self._writer.apply(subscription, decide(retry, self._clock()))
                if not subscription.looked:
                    # One line per object learnt (not per refresh): the sign that a start,
                    # or a spec change, has been looked at, whatever the look found.
                    subscription.looked = True
                    logger.info(
                        "%s looked at: %s", subscription.log_context, _ready_reason(subscription)
                    )
            except _Superseded:
                return
            except KubeError as error:
                logger.warning("%s status not written: %s", subscription.log_context, error)
            except Exception as error:
                await self._internal_error(subscription, error)

    async def _internal_error(self, subscription: Subscription, error: Exception) -> None:
        """A bug must not silently end this TokenRequest's refreshes, nor hide in the log.

        Status says InternalError (where to look, never the exception's text: it could
        hold a secret), `m2m_look_errors_total` counts it, and it is retried on the
        backoff schedule. Should deciding or writing that fail too, it is still retried.
        """
        kind = type(error).__name__
        logger.error(
            "%s look failed unexpectedly: error=%s",
            subscription.log_context,
            kind,
            exc_info=error,
        )
        metrics.record_look_error()
        message = (
            f"An unexpected error ({kind}) ended the operator's look at this TokenRequest;"
            " the operator's log has its traceback: search for"
            f" 'tokenrequest={subscription.namespace}/{subscription.name}' and"
            " 'look failed unexpectedly'. Retrying with backoff"
        )
        try:
            facts = revised(self._gatherer.known_facts(subscription), internal_error=message)
            facts = await self._gatherer.with_secret(subscription, facts)
            await self._writer.apply(subscription, decide(facts, self._clock()))
        except Exception:
            logger.exception("%s could not report the error in status", subscription.log_context)
            failures = subscription.api_failures + 1
            delay = self._retry.backoff(failures=failures, jitter_fraction=self._random())
            subscription.api_failures = failures
            self.scheduler.reschedule(subscription.ref, self._clock() + delay)

    async def _relearn(self, subscription: Subscription) -> None:
        """After a pause: learn the object as it is now (the active replica wrote its
        status, which the watch's events do not teach a known object), or forget it if
        it went away."""
        current = await self._kube.read_token_request(subscription.namespace, subscription.name)
        if not self.registry.current(subscription):
            return  # the watch taught us the object meanwhile (maybe a new one)
        if current is None or current.get("metadata", {}).get("uid") != subscription.uid:
            self.forget(subscription.namespace, subscription.name, subscription.uid)
            return
        fresh = self._learn(current)
        fresh.stale = False  # learnt from the object as it is now
        self.scheduler.schedule(fresh.ref, self._clock())

    def _fan_out(self, key: CacheKey, origin: ObjectRef) -> None:
        now = self._clock()
        for ref in self.registry.sharing_key(key):
            if ref != origin:
                self.scheduler.schedule(ref, now)


def _ready_reason(subscription: Subscription) -> str:
    for condition in subscription.status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return f"Ready={condition.get('status')} reason={condition.get('reason')}"
    return "no Ready condition"


class SecretEventsDuringLooks:
    """Owned-Secret events that arrive while a look at their TokenRequest is under way.

    The watch echoes a look's own Secret write, sometimes before the write's answer is
    back (for a quarter of a burst's writes on a busy machine): judged then, the echo is
    a version no look has seen, an edit for all the reconciler knows, and it cost the
    TokenRequest a second look. Held until the look ends, it is judged with the write
    remembered; an edit made during the look is still a version nobody has seen then.
    """

    def __init__(self) -> None:
        self._held: dict[ObjectRef, dict[ObjectRef, Mapping[str, Any]]] = {}

    def hold(self, owner: ObjectRef, secret_ref: ObjectRef, secret: Mapping[str, Any]) -> None:
        self._held.setdefault(owner, {})[secret_ref] = secret  # the latest of each Secret

    def drifted(
        self,
        owner: ObjectRef,
        registry: Registry,
        drifted: Callable[[Subscription, Mapping[str, Any]], bool],
    ) -> bool:
        """After `owner`'s look: whether an event held meanwhile shows drift (and forget them)."""
        held = self._held.pop(owner, None)
        subscription = registry.get(owner)
        if not held or subscription is None:
            return False
        found = False
        for secret in held.values():  # each judged: a version nobody saw is marked unread
            found = drifted(subscription, secret) or found
        return found


def _secret_drifted(
    subscription: Subscription,
    secret: Mapping[str, Any],
    *,
    cache: TokenCache,
    store: OwnedSecrets | None,
) -> bool:
    """Whether a Secret event shows the Secret differs from what the look would write."""
    if subscription.key is None or subscription.spec is None:
        return False
    data = secret.get("data")
    metadata = secret.get("metadata", {})
    where = (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))
    version = str(metadata.get("resourceVersion") or "")
    if data is None and store is not None and store.seen_at(*where, version):
        # The echo of a look's own write (or read) of this very version: that look knew
        # all of it, and what changed since (a token, the spec) wakes the TokenRequest.
        return False
    cached = cache.peek(subscription.key)
    if cached.token is None:
        return False
    if data is None:
        # A metadata-only event: the data is known if a look wrote or read this version.
        data = None if store is None else store.data_at(*where, version)
        if data is None:
            if store is not None:
                store.changed(*where, version)
            return True  # changed since the operator saw it, perhaps edited: read it
    if data != secret_data(scope=subscription.spec.scope, token=cached.token):
        return True
    labels = metadata.get("labels") or {}
    if any(labels.get(k) != v for k, v in secret_labels(subscription.owner).items()):
        return True
    if template_drifted_from(secret, subscription.spec.secret_template):
        return True  # the template's labels and annotations are kept like the data
    return not is_owned_by(secret, subscription.uid)


class Gatherer:
    """The facts of one look: reads only (the API, the watches' stores, the token cache).

    Besides the facts, it keeps the registry's key indexes and the cache's subscriptions
    in step with the credentials it reads, and renders the Secret the look is to write;
    `Writer` writes it.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        kube: KubeApi,
        cache: TokenCache,
        clock: Callable[[], datetime],
        seal_key: SealKey,
        identity_namespaces: OperatorIdentityNamespaces,
        registry: Registry,
        credentials: CredentialsReader,
        seeder: Seeder,
        fetched: Callable[[CacheKey, ObjectRef], None],
        while_waiting: Callable[[], AbstractAsyncContextManager[object]],
        random: Callable[[], float],
        owned_secrets: OwnedSecrets | None,
    ) -> None:
        self._kube = kube
        self._cache = cache
        self._clock = clock
        self._seal_key = seal_key
        self._identity_namespaces = identity_namespaces
        self._registry = registry
        self._credentials = credentials
        self._seeder = seeder
        self._fetched = fetched  # a token was fetched: the key's other subscribers want it
        # A look waiting for a token request gives back its slot (`while_waiting`), so
        # each namespace's token requests are bounded here instead.
        self._while_waiting = while_waiting
        self._fetch_budget = NamespaceBudget(settings.namespace_fetch_concurrency)
        self._random = random
        self._owned_secrets = owned_secrets
        self._retry: RetryPolicy = settings.retry_policy()
        self._unserved_namespaces = {settings.operator_namespace, settings.seal_key_secret[0]}

    def known_facts(self, subscription: Subscription) -> Facts:
        """What is known before any call: the object as learnt and this replica's memory."""
        spec = subscription.spec
        return Facts(
            name=subscription.name,
            generation=subscription.generation,
            previous_status=subscription.status,
            retry=self._retry,
            jitter=self._random(),
            spec=spec,
            spec_error=subscription.spec_error,
            deleting=subscription.deleting,
            credentials_failures=subscription.credentials_failures,
            api_failures=subscription.api_failures,
            conflicts=subscription.conflicts,
            remembered_token=self._cache.peek(subscription.key).token if subscription.key else None,
        )

    async def gather(self, subscription: Subscription) -> tuple[Facts, SecretWrite | None]:
        """The facts of one look, and the Secret to write (None: nothing to write)."""
        spec = subscription.spec
        facts = self.known_facts(subscription)
        if subscription.deleting:
            return facts, None
        if subscription.namespace in self._unserved_namespaces:
            # Before any read: a secretRef here would name the operator's own identity
            # Secret, a secretName its seal key.
            return revised(facts, in_operator_namespace=True), None
        if spec is None:
            return facts, None
        allowed = True
        if _uses_operator_identity(spec):
            allowed_here = self._identity_namespaces.allowed(subscription.namespace)
            if allowed_here is None:
                denied = self._identity_namespaces.permission_denied
                if denied is not None:
                    return await self._permission_denied(subscription, facts, denied), None
                return revised(facts, operator_identity_pending=True), None
            allowed = allowed_here
        try:
            # Looked up once per look (the watch's copy, or a read after a conflict): for the
            # conflict check, the token it holds, the seeding and the write. The watch's copy
            # is metadata; its data is read, or inferred from its seal, where a step needs it.
            existing, guessed = await self._read_own_secret(subscription)
            facts = revised(
                facts,
                secret_read=True,
                secret_foreign=existing is not None and not is_owned_by(existing, subscription.uid),
            )
            if facts.secret_foreign:
                return facts, None  # nothing could be delivered: no token is fetched for it
            if not allowed:
                # No token request as the operator's identity here; the token in the Secret
                # serves until it expires. Out of the shared entry: its refreshes are not
                # for this namespace any more.
                self._registry.drop_key(subscription)
                denial = self._identity_namespaces.denial_message(subscription.namespace)
                facts, _ = await self._secret_facts(subscription, facts, existing)
                return revised(facts, operator_identity_denied=denial), None
            try:
                credentials = await self._credentials.read(subscription)
            except CredentialsError as error:
                facts, _ = await self._secret_facts(subscription, facts, existing)
                return revised(facts, credentials_error=error), None
            # The secret, key or assertion is registered with REDACTOR where it is read or made.
            if not client_id_shown(credentials.client_id):
                # Perhaps a secret in the wrong key.
                REDACTOR.register(credentials.client_id, holder=credentials)
            if not self._registry.current(subscription):
                raise _Superseded
            key = CacheKey.for_credentials(credentials, spec.scope)
            if key != subscription.key:
                self._registry.use_key(subscription, key)
            # Before any fetch: the token of this key may be in some owned Secret already
            # (after a start, also one written for another TokenRequest). The seal decides:
            # a token of another identity or scope, or an edited one, never verifies.
            await self._seeder.seed(subscription, key, credentials, existing)
            # The shared token is refreshed at the latest point its subscribers allow.
            self._cache.subscribe(key, subscription.ref, spec.refresh_before)
            forced = subscription.refresh_request
            holds = Holds(
                budget=functools.partial(self._fetch_budget.held, subscription.namespace),
                while_waiting=self._while_waiting,
            )
            if forced is not None:
                # m2m.dev/refresh: a new token now, bypassing the cache (rate-limited per key).
                facts = revised(facts, refresh_request=forced)
                result = await self._cache.force(
                    credentials,
                    spec.scope,
                    refresh_before=spec.refresh_before,
                    holds=holds,
                )
            else:
                result = await self._cache.get(
                    credentials,
                    spec.scope,
                    refresh_before=spec.refresh_before,
                    holds=holds,
                )
            metrics.record_cache_lookup(fetched=result.fetched)
            if result.token is not None:
                REDACTOR.register(result.token.value, holder=result.token)
                if result.fetched:
                    self._fetched(key, subscription.ref)  # the others want it too
            if not self._registry.current(subscription):
                raise _Superseded
            facts = revised(facts, cache=result)
            if _uses_operator_identity(spec) and not self._identity_namespaces.allowed(
                subscription.namespace
            ):
                # The grant was revoked while the token was fetched: nothing is written.
                # The token stays cached for the namespaces still granted it.
                self._registry.drop_key(subscription)
                denial = self._identity_namespaces.denial_message(subscription.namespace)
                return revised(facts, operator_identity_denied=denial), None
            token = result.token
            seal = None if token is None else self._seal_key.seal(key, credentials, token)
            facts, existing = await self._secret_facts(
                subscription,
                facts,
                existing,
                writing=None if token is None or seal is None else (token, seal),
            )
            if token is None or seal is None or facts.secret_foreign:
                return facts, None
            desired = render_secret(
                owner=subscription.owner,
                secret_name=spec.secret_name,
                scope=spec.scope,
                token=token,
                seal=seal,
                template=spec.secret_template,
                key_id=self._seal_key.key_id(key, credentials),
            )
            return facts, SecretWrite(desired=desired, existing=existing, guessed=guessed)
        except KubeError as error:
            # Not Kopf's to retry: it would call the token endpoint again on its own
            # schedule. The token already fetched stays cached for the next look.
            return revised(facts, api_error=error), None

    async def _permission_denied(
        self, subscription: Subscription, facts: Facts, denied: str
    ) -> Facts:
        """A missing permission blocks this look: said in status, with the Secret's token."""
        return await self.with_secret(subscription, revised(facts, permission_denied=denied))

    async def with_secret(self, subscription: Subscription, facts: Facts) -> Facts:
        """The facts of a look that ended early, with the token its Secret holds (Ready)."""
        if subscription.spec is None:
            return facts
        try:
            existing, _ = await self._read_own_secret(subscription)
        except KubeError:
            return facts  # what was last served stands in for the Secret
        return revised(
            facts,
            secret_read=True,
            secret_foreign=existing is not None and not is_owned_by(existing, subscription.uid),
            secret_token=_token_in(subscription, existing, now=self._clock()),
        )

    async def _read_own_secret(
        self, subscription: Subscription
    ) -> tuple[Mapping[str, Any] | None, bool]:
        """The TokenRequest's Secret, and whether that is the watch's guess, not a read.

        The owned-Secrets watch answers without an API call; a write based on its answer
        that the server refuses (409) is corrected with a read. After a conflict the
        name is held by a Secret the watch cannot show, so each look reads it.
        """
        assert subscription.spec is not None
        store = self._owned_secrets
        if store is not None and store.ready() and subscription.conflicts == 0:
            return store.get(subscription.namespace, subscription.spec.secret_name), True
        secret = await self._kube.read_secret(subscription.namespace, subscription.spec.secret_name)
        _remember(self._owned_secrets, secret)
        return secret, False

    async def _secret_facts(
        self,
        subscription: Subscription,
        facts: Facts,
        secret: Mapping[str, Any] | None,
        *,
        writing: tuple[AccessToken, str] | None = None,
    ) -> tuple[Facts, Mapping[str, Any] | None]:
        """The facts about the look's Secret that need its data, and the Secret with it.

        The watch's copy carries no data. It is known without a call when a look wrote or
        read that very version; or, for a Secret no look has read or written since the
        start, when its seal is that of the token about to be written (`writing`: the
        token and its seal) and its managedFields give no part of its data to anyone but
        the operator: the operator wrote that token there, and nobody changed it since.
        Otherwise the Secret changed since the operator last saw it: it is read.
        """
        if secret is not None and "data" not in secret:
            metadata = secret.get("metadata", {})
            namespace = str(metadata.get("namespace") or subscription.namespace)
            name = str(metadata.get("name") or "")
            seal = str((metadata.get("annotations") or {}).get(SEAL_ANNOTATION) or "")
            store = self._owned_secrets
            if (
                writing is not None
                and facts.spec is not None
                and store is not None
                and not store.data_seen(namespace, name)
                and not store.data_edited(namespace, name)
                and hmac.compare_digest(seal.encode(), writing[1].encode())
            ):
                data = secret_data(scope=facts.spec.scope, token=writing[0])
                secret = {**secret, "data": data}
            else:
                secret = await self._kube.read_secret(namespace, name)
            _remember(self._owned_secrets, secret)
        foreign = secret is not None and not is_owned_by(secret, subscription.uid)
        return (
            revised(
                facts,
                secret_foreign=foreign,
                secret_token=None
                if foreign
                else _token_in(subscription, secret, now=self._clock()),
            ),
            secret,
        )


class CredentialsReader:
    """The client credentials a TokenRequest names, read afresh at each look."""

    def __init__(
        self, *, settings: Settings, kube: KubeApi, environ: Mapping[str, str] | None
    ) -> None:
        self._settings = settings
        self._kube = kube
        self._environ = environ
        self._endpoint_policy = settings.endpoint_policy()
        self._operator_identity: ClientCredentials | None = None  # as last read

    async def read(self, subscription: Subscription) -> ClientCredentials:
        assert subscription.spec is not None
        account_name = subscription.spec.credentials_service_account
        if account_name is not None:
            # Workload identity federation: looked at afresh each time (no watch), so an
            # annotation or a ServiceAccount that appears is found by the next retry.
            account = await self._kube.read_service_account(subscription.namespace, account_name)
            default_endpoint = await asyncio.to_thread(
                operator_token_endpoint, self._settings.credentials_dir, self._environ
            )
            return federated_identity(
                account,
                namespace=subscription.namespace,
                name=account_name,
                policy=self._endpoint_policy,
                default_endpoint=default_endpoint,
                allow_insecure_http=self._settings.allow_insecure_http,
                audience=self._settings.federation_audience,
                mint=self._kube.mint_service_account_token,  # blocking: on the assertion thread
            )
        if subscription.spec.credentials_secret is None:
            # Read afresh each time: a mounted Secret may have been rotated in place. Files
            # are read on a thread; the environment alone is read here, since the hop to a
            # thread cost more than the read (an eighth of a burst's CPU, profiled).
            read_identity = functools.partial(
                operator_identity,
                self._settings.credentials_dir,
                self._environ,
                allow_insecure_http=self._settings.allow_insecure_http,
                reuse=self._operator_identity,
            )
            if self._settings.credentials_dir is None:
                identity = read_identity()
            else:
                identity = await asyncio.to_thread(read_identity)
            self._operator_identity = identity
            return identity
        secret = await self._kube.read_secret(
            subscription.namespace, subscription.spec.credentials_secret
        )
        # Read afresh at each look: a rotated secret or key is used at the next request.
        return credentials_from_secret(
            None if secret is None else (secret.get("data") or {}),
            namespace=subscription.namespace,
            name=subscription.spec.credentials_secret,
            policy=self._endpoint_policy,
        )


class Seeder:
    """After a start, the token cache filled from owned Secrets whose seal verifies."""

    def __init__(
        self,
        *,
        kube: KubeApi,
        cache: TokenCache,
        clock: Callable[[], datetime],
        seal_key: SealKey,
        owned_secrets: OwnedSecrets | None,
    ) -> None:
        self._kube = kube
        self._cache = cache
        self._clock = clock
        self._seal_key = seal_key
        self._owned_secrets = owned_secrets
        # One seeding per key at a time: the other looks of that key wait for its answer.
        self._seeding: dict[CacheKey, asyncio.Future[None]] = {}
        self._owned_secrets_waited = False  # the watch's first list was waited for once

    async def seed(
        self,
        subscription: Subscription,
        key: CacheKey,
        credentials: ClientCredentials,
        own: Mapping[str, Any] | None,
    ) -> None:
        """After a start an owned Secret may hold a good token of this key: reuse it, call
        nobody. One seeding per key at a time; the key's other looks wait for it."""
        if self._cache.peek(key).token is not None:
            return
        seeding = self._seeding.get(key)
        if seeding is None:
            seeding = asyncio.ensure_future(self._seed_key(subscription, key, credentials, own))
            self._seeding[key] = seeding
            seeding.add_done_callback(lambda _: self._seeding.pop(key, None))
        await asyncio.shield(seeding)

    async def _seed_key(
        self,
        subscription: Subscription,
        key: CacheKey,
        credentials: ClientCredentials,
        own: Mapping[str, Any] | None,
    ) -> None:
        """Find the key's Secrets by their key-id annotation (metadata, no call), read the
        latest-expiring one, and seed the cache with its token if its seal verifies."""
        store = self._owned_secrets
        candidates: dict[tuple[str, str], Mapping[str, Any]] = {}
        if store is not None:
            if not store.ready() and not self._owned_secrets_waited:
                # The first looks after a start: before anyone fetches, every owned Secret
                # must be known, or a key whose token is in a Secret is fetched again.
                try:
                    async with asyncio.timeout(OWNED_SECRETS_WAIT_SECONDS):
                        await store.wait_ready()
                except TimeoutError:
                    logger.warning(
                        "The owned-Secrets watch has not listed within %.0f s (check its"
                        " list/watch rights on Secrets); tokens are seeded from each"
                        " TokenRequest's own Secret only",
                        OWNED_SECRETS_WAIT_SECONDS,
                    )
                self._owned_secrets_waited = True
            if store.ready():
                for found in store.with_key_id(self._seal_key.key_id(key, credentials)):
                    candidates[_secret_ref(found)] = found
        if own is not None and is_owned_by(own, subscription.uid):
            # Perhaps written before key ids existed.
            candidates.setdefault(_secret_ref(own), own)
        now = self._clock()
        usable = sorted(
            (
                (expires_at, candidate)
                for candidate in candidates.values()
                if (expires_at := _annotated_expiry(candidate)) is not None and expires_at > now
            ),
            key=lambda pair: pair[0],
            reverse=True,
        )
        for _, candidate in usable[:SEED_READS]:
            secret: Mapping[str, Any] | None = candidate
            if "data" not in candidate:
                namespace, name = _secret_ref(candidate)
                try:
                    secret = await self._kube.read_secret(namespace, name)
                except KubeError as error:
                    logger.warning("Secret %s/%s not read for seeding: %s", namespace, name, error)
                    return  # the API is in trouble: fetch rather than wait for it
                _remember(self._owned_secrets, secret)
            owner = None if secret is None else token_request_owner(secret.get("metadata", {}))
            if secret is None or owner is None:
                continue
            token = token_from_secret(
                secret,
                owner_uid=owner,
                scope=key.scope,
                now=self._clock(),
                seal_for=lambda token: self._seal_key.seal(key, credentials, token),
            )
            if token is not None:
                REDACTOR.register(token.value, holder=token)
                self._cache.seed(key, token)
                where = _secret_ref(secret)
                own_name = subscription.spec.secret_name if subscription.spec else None
                if where == (subscription.namespace, own_name):
                    found_in = "its Secret"
                else:
                    found_in = f"Secret {where[0]}/{where[1]} (same identity and scope)"
                logger.info(
                    "%s reusing the unexpired token found in %s", subscription.log_context, found_in
                )
                return


class Writer:
    """Every write of a look, in its order: the Secret, then (after `decide`) the wake-up,
    the status and the events. Decides nothing; the only caller of
    `Scheduler.reschedule` for looks."""

    def __init__(
        self,
        *,
        kube: KubeApi,
        clock: Callable[[], datetime],
        registry: Registry,
        scheduler: Scheduler[ObjectRef],
        forget: _Forget,
        owned_secrets: OwnedSecrets | None,
    ) -> None:
        self._kube = kube
        self._clock = clock
        self._registry = registry
        self._scheduler = scheduler
        self._forget = forget
        self._owned_secrets = owned_secrets

    async def write_secret(
        self, subscription: Subscription, facts: Facts, secret_write: SecretWrite
    ) -> Facts:
        """Write the look's Secret: how that went (or the API error) is a fact too."""
        assert subscription.spec is not None
        spec = subscription.spec
        desired, existing = secret_write.desired, secret_write.existing
        try:
            written = await write_secret(
                self._kube,
                desired=desired,
                owner_uid=subscription.uid,
                existing=existing,
                written=self._remember,
            )
            if secret_write.guessed and written in (WriteOutcome.CONFLICT, WriteOutcome.RACED):
                # The watch was behind the API server, or the name is held by a Secret it
                # never shows (someone else's, or ours without its label): the server's
                # copy decides, as if it had been read first.
                existing = await self._kube.read_secret(subscription.namespace, spec.secret_name)
                self._remember(existing)
                if existing is not None and not is_owned_by(existing, subscription.uid):
                    return revised(facts, secret_foreign=True, secret_token=None)
                facts = revised(
                    facts, secret_token=_token_in(subscription, existing, now=self._clock())
                )
                if not self._registry.current(subscription):
                    raise _Superseded
                written = await write_secret(
                    self._kube,
                    desired=desired,
                    owner_uid=subscription.uid,
                    existing=existing,
                    written=self._remember,
                )
            facts = revised(facts, write=written)
            delivered = written not in (WriteOutcome.CONFLICT, WriteOutcome.RACED)
            if delivered and subscription.cleanup_pending:
                # Only now: the workload keeps its old Secret until the new one holds a token.
                await self._remove_previous_secrets(subscription)
                subscription.cleanup_pending = False
            return facts
        except KubeError as error:
            # Not Kopf's to retry: it would call the token endpoint again on its own
            # schedule. The token already fetched stays cached for the next look.
            return revised(facts, api_error=error)

    async def apply(self, subscription: Subscription, outcome: Outcome) -> None:
        """Carry the outcome out: logs, metrics, the next wake-up, the status, the events."""
        for level, message in outcome.log:
            logger.log(level, "%s %s", subscription.log_context, message)
        if not outcome.serve:
            self._forget(subscription.namespace, subscription.name, subscription.uid)
            return
        if not self._registry.current(subscription):
            # Deleted or replaced during the look (the uid check, in memory): nothing of it
            # may reach the name's status or wake-up, which may be another object's now.
            return
        subscription.credentials_failures = outcome.credentials_failures
        subscription.conflicts = outcome.conflicts
        subscription.api_failures = outcome.api_failures
        for reason in outcome.count_failures:
            metrics.record_refresh_failure(subscription.namespace, subscription.name, reason=reason)
        # First: a status write that fails below must not leave the object without one.
        self._scheduler.reschedule(subscription.ref, outcome.wake_at)
        if outcome.status is None:
            return
        if outcome.write_status:
            found = await self._kube.patch_token_request_status(
                subscription.namespace, subscription.name, outcome.status, uid=subscription.uid
            )
            if not found:
                # No object with its uid (deleted or replaced before any watch told us):
                # stop serving it; the new object under the name is learnt on its own.
                self._forget(
                    subscription.namespace,
                    subscription.name,
                    subscription.uid,
                    why="its status patch found no object with its uid",
                )
                return
            subscription.status = outcome.status
        handled = outcome.observation.last_refresh_request if outcome.observation else None
        if handled is not None and subscription.refresh_request == handled:
            subscription.refresh_request = None  # recorded in status: done
        now = self._clock()
        # In the background: the status is what the workload's owners wait for.
        self._kube.post_events(
            subscription.namespace,
            [
                event_body(
                    namespace=subscription.namespace,
                    name=subscription.name,
                    uid=subscription.uid,
                    event=event,
                    now=now,
                )
                for event in outcome.events
            ],
        )
        if not self._registry.current(subscription):
            return  # deleted meanwhile: its metrics are gone and must stay gone
        metrics.observe_token_request(
            subscription.namespace,
            subscription.name,
            ready=outcome.token is not None,
            expires_at=outcome.token.expires_at if outcome.token else None,
        )

    async def _remove_previous_secrets(self, subscription: Subscription) -> None:
        """After a spec.secretName change: the old Secret goes, once the new one is written."""
        assert subscription.spec is not None
        deleted = await delete_other_owned_secrets(
            self._kube, owner=subscription.owner, keep=subscription.spec.secret_name
        )
        for name in deleted:
            logger.info("%s deleted its previous Secret %s", subscription.log_context, name)

    def _remember(self, secret: Mapping[str, Any] | None) -> None:
        _remember(self._owned_secrets, secret)


def _remember(store: OwnedSecrets | None, secret: Mapping[str, Any] | None) -> None:
    """A Secret read or written in full: its data is known at that resourceVersion."""
    if secret is not None and store is not None:
        store.remember(secret)


def _token_in(
    subscription: Subscription, secret: Mapping[str, Any] | None, *, now: datetime
) -> AccessToken | None:
    """What the workload reads now: the unexpired token in the owned Secret, if any."""
    if secret is None or subscription.spec is None:
        return None
    return token_from_secret(
        secret,
        owner_uid=subscription.uid,
        scope=subscription.spec.scope,
        now=now,
        seal_for=None,  # whoever wrote it; a token is served from the cache only if sealed
    )


def _secret_ref(secret: Mapping[str, Any]) -> tuple[str, str]:
    metadata = secret.get("metadata", {})
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


def _annotated_expiry(secret: Mapping[str, Any]) -> datetime | None:
    """The expiry an owned Secret's annotation states (not proof: the seal is checked)."""
    text = (secret.get("metadata", {}).get("annotations") or {}).get(EXPIRES_AT_ANNOTATION)
    try:
        return parse_time(str(text)) if text else None
    except ValueError:
        return None
