"""From a TokenRequest to a Secret holding a valid token, and back to its status.

One `TokenRequestReconciler` serves the whole operator. Each look at a
TokenRequest has three steps, as cert-manager's controllers do:

- `_gather`: the I/O that finds the facts (the Secret as read, the credentials
  or why they failed, the shared token cache's answer, the write of the Secret);
- `decision.decide`: a pure function from those facts to an outcome (which
  token the Secret holds, the status, the events, when to look again);
- `_apply`: status, events, metrics and the next wake-up, deciding nothing; the
  only caller of `Scheduler.reschedule`.

The TokenRequests it knows live in a `Registry`. When a token is fetched, every
other subscription of the same key is woken at once, so one call to the token
endpoint serves them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random as _random
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from m2m_token_operator import metrics
from m2m_token_operator.admission import look_started
from m2m_token_operator.cache import CacheKey, TokenCache
from m2m_token_operator.client import client_id_shown
from m2m_token_operator.credentials import (
    ClientCredentials,
    CredentialsError,
    credentials_from_secret,
    operator_identity,
    operator_token_endpoint,
)
from m2m_token_operator.decision import Facts, Outcome, decide
from m2m_token_operator.federation import federated_identity
from m2m_token_operator.kube import KubeApi, KubeError
from m2m_token_operator.models import TokenRequestSpec
from m2m_token_operator.namespaces import OperatorIdentityNamespaces
from m2m_token_operator.policy import RetryPolicy
from m2m_token_operator.redaction import REDACTOR
from m2m_token_operator.registry import ObjectRef, Registry, Subscription
from m2m_token_operator.scheduler import Scheduler
from m2m_token_operator.seal import SealKey
from m2m_token_operator.secret_output import (
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
from m2m_token_operator.settings import Settings
from m2m_token_operator.status import event_body
from m2m_token_operator.tokens import AccessToken
from m2m_token_operator.watches import OwnedSecrets

logger = logging.getLogger(__name__)

__all__ = ["ObjectRef", "Subscription", "TokenRequestReconciler"]


class _Superseded(Exception):
    """The object was deleted or replaced during the look: its facts speak for nobody."""


def _uses_operator_identity(spec: TokenRequestSpec) -> bool:
    return spec.credentials_secret is None and spec.credentials_service_account is None


class TokenRequestReconciler:
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
        self._settings = settings
        self._kube = kube
        self._cache = cache
        self._clock = clock
        self._seal_key = seal_key
        self._identity_namespaces = identity_namespaces
        self._environ = environ
        self._random = random
        self._owned_secrets = owned_secrets
        self._retry: RetryPolicy = settings.retry_policy()
        self._endpoint_policy = settings.endpoint_policy()
        self.registry = Registry(
            default_cluster=settings.cluster_name,
            on_key_unused=cache.forget,
            on_key_left=cache.unsubscribe,
        )
        self.scheduler: Scheduler[ObjectRef] = Scheduler(clock=clock, handle=self._scheduled)

    # Entry points (called from Kopf handlers)

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

    def forget(self, namespace: str, name: str, uid: str | None = None) -> None:
        """The TokenRequest is gone; its Secret goes with it through garbage collection.

        With `uid`, only that object: the DELETED event of an object deleted and created
        again under the same name may arrive after the new one was learnt.
        """
        subscription = self.registry.forget(namespace, name, uid)
        if subscription is None:
            return
        self.scheduler.schedule(subscription.ref, None)
        metrics.forget_token_request(namespace, name)
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
            if deleted or self._secret_drifted(subscription, secret):
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

        The looks under way are cancelled (they are due again for the resume), the
        events not posted yet are dropped, and only the active replica speaks for the
        TokenRequests in metrics.
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

    def _secret_drifted(self, subscription: Subscription, secret: Mapping[str, Any]) -> bool:
        if subscription.key is None or subscription.spec is None:
            return False
        cached = self._cache.peek(subscription.key)
        if cached.token is None:
            return False
        data = secret.get("data") or {}
        if data != secret_data(scope=subscription.spec.scope, token=cached.token):
            return True
        labels = secret.get("metadata", {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in secret_labels(subscription.owner).items()):
            return True
        if template_drifted_from(secret, subscription.spec.secret_template):
            return True  # the template's labels and annotations are kept like the data
        return not is_owned_by(secret, subscription.uid)

    # One look: gather → decide → apply

    async def _scheduled(self, ref: ObjectRef) -> None:
        subscription = self.registry.get(ref)
        if subscription is not None:
            await self._look(subscription)

    async def _look(self, subscription: Subscription) -> None:
        with look_started():
            await self._look_now(subscription)

    async def _look_now(self, subscription: Subscription) -> None:
        async with subscription.lock:
            if not self.registry.current(subscription):
                return  # replaced by a newer version of the object, or deleted meanwhile
            try:
                if subscription.stale:
                    try:
                        await self._relearn(subscription)
                    except KubeError as error:
                        failed = dataclasses.replace(self._facts(subscription), api_error=error)
                        await self._apply(subscription, decide(failed, self._clock()))
                    return
                facts = await self._gather(subscription)
                try:
                    await self._apply(subscription, decide(facts, self._clock()))
                except KubeError as error:
                    # The status (or an old Secret's deletion) failed after the facts were
                    # in: the same facts with that error. What was fetched stays cached.
                    cache = facts.cache and dataclasses.replace(facts.cache, fetched=False)
                    retry = dataclasses.replace(facts, api_error=error, cache=cache)
                    await self._apply(subscription, decide(retry, self._clock()))
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
            facts = dataclasses.replace(self._facts(subscription), internal_error=message)
            facts = await self._with_secret(subscription, facts)
            await self._apply(subscription, decide(facts, self._clock()))
        except Exception:
            logger.exception("%s could not report the error in status", subscription.log_context)
            failures = subscription.api_failures + 1
            delay = self._retry.backoff(failures=failures, jitter_fraction=self._random())
            subscription.api_failures = failures
            self.scheduler.reschedule(subscription.ref, self._clock() + delay)

    def _facts(self, subscription: Subscription) -> Facts:
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

    async def _gather(self, subscription: Subscription) -> Facts:
        """The facts of one look. Writes the Secret: how that went is a fact too."""
        spec = subscription.spec
        facts = self._facts(subscription)
        if spec is None or subscription.deleting:
            return facts
        allowed = True
        if _uses_operator_identity(spec):
            allowed_here = self._identity_namespaces.allowed(subscription.namespace)
            if allowed_here is None:
                denied = self._identity_namespaces.permission_denied
                if denied is not None:
                    return await self._permission_denied(subscription, facts, denied)
                return dataclasses.replace(facts, operator_identity_pending=True)
            allowed = allowed_here
        try:
            # Looked up once per look (the watch's copy, or a read after a conflict): for the
            # conflict check, the token it holds, the seeding and the write.
            existing, guessed = await self._read_own_secret(subscription)
            facts = dataclasses.replace(
                facts,
                secret_read=True,
                secret_foreign=existing is not None and not is_owned_by(existing, subscription.uid),
                secret_token=self._token_in(subscription, existing),
            )
            if facts.secret_foreign:
                return facts  # nothing could be delivered: no token is fetched for it
            if not allowed:
                # No token request as the operator's identity here; the token in the Secret
                # serves until it expires. Out of the shared entry: its refreshes are not
                # for this namespace any more.
                self.registry.drop_key(subscription)
                denial = self._identity_namespaces.denial_message(subscription.namespace)
                return dataclasses.replace(facts, operator_identity_denied=denial)
            try:
                credentials = await self._credentials(subscription)
            except CredentialsError as error:
                return dataclasses.replace(facts, credentials_error=error)
            # The secret, key or assertion is registered with REDACTOR where it is read or made.
            if not client_id_shown(credentials.client_id):
                REDACTOR.register(credentials.client_id)  # perhaps a secret in the wrong key
            if not self.registry.current(subscription):
                raise _Superseded
            key = CacheKey.for_credentials(credentials, spec.scope)
            if key != subscription.key:
                # Seed only on the first look since the operator started: a key that changes
                # later means a new identity (or scope), and the Secret holds the token of
                # the old one, which must never be served as the new identity's token.
                first_look = subscription.key is None
                self.registry.use_key(subscription, key)
                if first_look:
                    self._seed_from_secret(subscription, key, credentials, existing)
            # The shared token is refreshed at the latest point its subscribers allow.
            self._cache.subscribe(key, subscription.ref, spec.refresh_before)
            forced = subscription.refresh_request
            if forced is not None:
                # m2m.dev/refresh: a new token now, bypassing the cache (rate-limited per key).
                facts = dataclasses.replace(facts, refresh_request=forced)
                result = await self._cache.force(
                    credentials, spec.scope, refresh_before=spec.refresh_before
                )
            else:
                result = await self._cache.get(
                    credentials, spec.scope, refresh_before=spec.refresh_before
                )
            metrics.record_cache_lookup(fetched=result.fetched)
            if result.token is not None:
                REDACTOR.register(result.token.value)
                if result.fetched:
                    self._fan_out(key, subscription.ref)  # the others want it too
            if not self.registry.current(subscription):
                raise _Superseded
            facts = dataclasses.replace(facts, cache=result)
            if result.token is None:
                return facts
            desired = render_secret(
                owner=subscription.owner,
                secret_name=spec.secret_name,
                scope=spec.scope,
                token=result.token,
                seal=self._seal(key, credentials, result.token),
                template=spec.secret_template,
            )
            written = await write_secret(
                self._kube, desired=desired, owner_uid=subscription.uid, existing=existing
            )
            if guessed and written in (WriteOutcome.CONFLICT, WriteOutcome.RACED):
                # The watch was behind the API server, or the name is held by a Secret it
                # never shows (someone else's, or ours without its label): the server's
                # copy decides, as if it had been read first.
                existing = await self._kube.read_secret(subscription.namespace, spec.secret_name)
                if existing is not None and not is_owned_by(existing, subscription.uid):
                    return dataclasses.replace(facts, secret_foreign=True, secret_token=None)
                facts = dataclasses.replace(
                    facts, secret_token=self._token_in(subscription, existing)
                )
                written = await write_secret(
                    self._kube, desired=desired, owner_uid=subscription.uid, existing=existing
                )
            facts = dataclasses.replace(facts, write=written)
            delivered = written not in (WriteOutcome.CONFLICT, WriteOutcome.RACED)
            if delivered and subscription.cleanup_pending:
                # Only now: the workload keeps its old Secret until the new one holds a token.
                await self._remove_previous_secrets(subscription)
                subscription.cleanup_pending = False
            return facts
        except KubeError as error:
            # Not Kopf's to retry: it would call the token endpoint again on its own
            # schedule. The token already fetched stays cached for the next look.
            return dataclasses.replace(facts, api_error=error)

    async def _permission_denied(
        self, subscription: Subscription, facts: Facts, denied: str
    ) -> Facts:
        """A missing permission blocks this look: said in status, with the Secret's token."""
        return await self._with_secret(
            subscription, dataclasses.replace(facts, permission_denied=denied)
        )

    async def _with_secret(self, subscription: Subscription, facts: Facts) -> Facts:
        """The facts of a look that ended early, with the token its Secret holds (Ready)."""
        if subscription.spec is None:
            return facts
        try:
            existing, _ = await self._read_own_secret(subscription)
        except KubeError:
            return facts  # what was last served stands in for the Secret
        return dataclasses.replace(
            facts,
            secret_read=True,
            secret_foreign=existing is not None and not is_owned_by(existing, subscription.uid),
            secret_token=self._token_in(subscription, existing),
        )

    async def _apply(self, subscription: Subscription, outcome: Outcome) -> None:
        """Carry the outcome out: logs, metrics, the next wake-up, the status, the events."""
        for level, message in outcome.log:
            logger.log(level, "%s %s", subscription.log_context, message)
        if not outcome.serve:
            self.forget(subscription.namespace, subscription.name, subscription.uid)
            return
        subscription.credentials_failures = outcome.credentials_failures
        subscription.conflicts = outcome.conflicts
        subscription.api_failures = outcome.api_failures
        for reason in outcome.count_failures:
            metrics.record_refresh_failure(subscription.namespace, subscription.name, reason=reason)
        # First: a status write that fails below must not leave the object without one.
        self.scheduler.reschedule(subscription.ref, outcome.wake_at)
        if outcome.status is None:
            return
        if outcome.write_status:
            found = await self._kube.patch_token_request_status(
                subscription.namespace, subscription.name, outcome.status
            )
            if not found:
                # Deleted without a DELETED event reaching us (a watch gap): stop serving it.
                self.forget(subscription.namespace, subscription.name, subscription.uid)
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
        if not self.registry.current(subscription):
            return  # deleted meanwhile: its metrics are gone and must stay gone
        metrics.observe_token_request(
            subscription.namespace,
            subscription.name,
            ready=outcome.token is not None,
            expires_at=outcome.token.expires_at if outcome.token else None,
        )

    # The pieces of a look

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
        return secret, False

    async def _credentials(self, subscription: Subscription) -> ClientCredentials:
        assert subscription.spec is not None
        account_name = subscription.spec.credentials_service_account
        if account_name is not None:
            # Workload identity federation: looked at afresh each time (no watch), so an
            # annotation or a ServiceAccount that appears is found by the next retry.
            account = await self._kube.read_service_account(subscription.namespace, account_name)
            default_endpoint = await asyncio.to_thread(
                operator_token_endpoint, self._settings, self._environ
            )
            return federated_identity(
                account,
                namespace=subscription.namespace,
                name=account_name,
                policy=self._endpoint_policy,
                default_endpoint=default_endpoint,
                allow_insecure_http=self._settings.allow_insecure_http,
                audience=self._settings.federation_audience,
                mint=self._kube.mint_service_account_token,  # blocking: on the fetch thread
            )
        if subscription.spec.credentials_secret is None:
            # Read afresh each time: a mounted Secret may have been rotated in place.
            return await asyncio.to_thread(operator_identity, self._settings, self._environ)
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

    def _seal(self, key: CacheKey, credentials: ClientCredentials, token: AccessToken) -> str:
        """The restart seal written beside a token, and the one it is checked against."""
        return self._seal_key.seal(key, credentials, token)

    def _token_in(
        self, subscription: Subscription, secret: Mapping[str, Any] | None
    ) -> AccessToken | None:
        """What the workload reads now: the unexpired token in the owned Secret, if any."""
        if secret is None or subscription.spec is None:
            return None
        return token_from_secret(
            secret,
            owner_uid=subscription.uid,
            scope=subscription.spec.scope,
            now=self._clock(),
            seal_for=None,  # whoever wrote it; a token is served from the cache only if sealed
        )

    def _seed_from_secret(
        self,
        subscription: Subscription,
        key: CacheKey,
        credentials: ClientCredentials,
        secret: Mapping[str, Any] | None,
    ) -> None:
        """After a restart the owned Secret still holds a good token: reuse it, call nobody."""
        if secret is None or self._cache.peek(key).token is not None:
            return
        token = token_from_secret(
            secret,
            owner_uid=subscription.uid,
            scope=key.scope,
            now=self._clock(),
            seal_for=lambda token: self._seal(key, credentials, token),
        )
        if token is not None:
            REDACTOR.register(token.value)
            self._cache.seed(key, token)
            logger.info(
                "%s reusing the unexpired token found in its Secret", subscription.log_context
            )

    async def _relearn(self, subscription: Subscription) -> None:
        """After a pause: learn the object as it is now (the active replica handled its
        changes, so Kopf will not replay them here), or forget it if it went away."""
        current = await self._kube.read_token_request(subscription.namespace, subscription.name)
        if not self.registry.current(subscription):
            return  # Kopf's re-listing taught us the object meanwhile (maybe a new one)
        if current is None or current.get("metadata", {}).get("uid") != subscription.uid:
            self.forget(subscription.namespace, subscription.name, subscription.uid)
            return
        fresh = self._learn(current)
        fresh.stale = False  # learnt from the object as it is now
        self.scheduler.schedule(fresh.ref, self._clock())

    async def _remove_previous_secrets(self, subscription: Subscription) -> None:
        """After a spec.secretName change: the old Secret goes, once the new one is written."""
        assert subscription.spec is not None
        deleted = await delete_other_owned_secrets(
            self._kube, owner=subscription.owner, keep=subscription.spec.secret_name
        )
        for name in deleted:
            logger.info("%s deleted its previous Secret %s", subscription.log_context, name)

    def _fan_out(self, key: CacheKey, origin: ObjectRef) -> None:
        now = self._clock()
        for ref in self.registry.sharing_key(key):
            if ref != origin:
                self.scheduler.schedule(ref, now)
