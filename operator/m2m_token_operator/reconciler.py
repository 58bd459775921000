"""From a TokenRequest to a Secret holding a valid token, and back to its status.

One `TokenRequestReconciler` serves the whole operator. It remembers each
TokenRequest it serves (a subscription), asks the shared token cache for the
token of the subscription's key, writes the Secret, writes the status only when
it changes, posts an event per change of state, and tells the scheduler when
to look again. When a token is fetched, every other subscription of the same
key is woken at once, so one call to the token endpoint serves them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from m2m_token_operator import metrics
from m2m_token_operator.cache import CacheKey, CacheResult, TokenCache
from m2m_token_operator.client import AccessToken, TokenEndpointError, client_id_shown
from m2m_token_operator.credentials import (
    CREDENTIALS_MISSING,
    ClientCredentials,
    CredentialsError,
    EndpointPolicy,
    credentials_from_secret,
    operator_identity,
)
from m2m_token_operator.kube import JsonObject, KubeApi, KubeError
from m2m_token_operator.models import SpecError, TokenRequestSpec, parse_spec
from m2m_token_operator.policy import RetryPolicy
from m2m_token_operator.redaction import REDACTOR
from m2m_token_operator.scheduler import Scheduler
from m2m_token_operator.secret_output import (
    Owner,
    WriteOutcome,
    delete_other_owned_secrets,
    is_owned_by,
    render_secret,
    secret_data,
    secret_labels,
    token_from_secret,
    write_secret,
)
from m2m_token_operator.settings import Settings
from m2m_token_operator.status import (
    INVALID_SPEC,
    KUBERNETES_API_ERROR,
    SECRET_CONFLICT,
    SECRET_WRITE_FAILED,
    Failure,
    Observation,
    build_status,
    event_body,
    status_changed,
    transition_events,
)

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
    credentials_failures: int = 0
    credentials_failed_at: datetime | None = None
    api_failures: int = 0  # consecutive looks ended by a Kubernetes API error
    conflicts: int = 0  # consecutive looks that found a foreign Secret under secretName
    # Owned Secrets under an old spec.secretName may remain: delete once the new one is written.
    cleanup_pending: bool = False
    # Another replica served the object while this one was paused: re-read before acting.
    stale: bool = False
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


def _token_id(token: AccessToken | None) -> str | None:
    """A short one-way digest to tell tokens apart in memory, never the token itself."""
    if token is None:
        return None
    return hashlib.sha256(token.value.encode()).hexdigest()[:16]


def _failure_from(error: Exception) -> Failure:
    if isinstance(error, TokenEndpointError | CredentialsError):
        return Failure(reason=error.reason, message=str(error))
    return Failure(reason="EndpointUnavailable", message=type(error).__name__)


def _failure_fields(error: Exception) -> str:
    """Structured log fields of a failure: the endpoint's correlation ids, never a secret."""
    if not isinstance(error, TokenEndpointError):
        return ""
    parts = [
        f"http_status={error.http_status}",
        f"error={error.error}",
        f"error_codes={','.join(str(c) for c in error.error_codes)}",
        f"trace_id={error.trace_id}",
        f"correlation_id={error.correlation_id}",
    ]
    return " " + " ".join(parts)


class TokenRequestReconciler:
    def __init__(
        self,
        *,
        settings: Settings,
        kube: KubeApi,
        cache: TokenCache,
        clock: Callable[[], datetime],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._kube = kube
        self._cache = cache
        self._clock = clock
        self._environ = environ
        self._retry: RetryPolicy = settings.retry_policy()
        self._endpoint_policy = EndpointPolicy(
            allowed_hosts=settings.allowed_endpoint_hosts,
            allow_insecure_http=settings.allow_insecure_http,
        )
        self._subscriptions: dict[ObjectRef, Subscription] = {}
        self._by_key: defaultdict[CacheKey, set[ObjectRef]] = defaultdict(set)
        self._by_credentials: defaultdict[ObjectRef, set[ObjectRef]] = defaultdict(set)
        # A set: two TokenRequests may name one Secret (one owns it, the other is in conflict).
        self._by_secret: defaultdict[ObjectRef, set[ObjectRef]] = defaultdict(set)
        self.scheduler: Scheduler[ObjectRef] = Scheduler(clock=clock, handle=self._scheduled)

    # Entry points (called from Kopf handlers)

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        """Create, update or resume: (re)learn the TokenRequest and bring its Secret in line."""
        subscription = self._learn(body)
        await self._sync(subscription)

    def forget(self, namespace: str, name: str, uid: str | None = None) -> None:
        """The TokenRequest is gone; its Secret goes with it through garbage collection.

        With `uid`, only that object: the DELETED event of an object deleted and created
        again under the same name may arrive after the new one was learnt.
        """
        subscription = self._subscriptions.get((namespace, name))
        if subscription is None or (uid is not None and subscription.uid != uid):
            return
        del self._subscriptions[(namespace, name)]
        self._unindex(subscription)
        self.scheduler.schedule(subscription.ref, None)
        metrics.forget_token_request(namespace, name)
        logger.info("%s forgotten (deleted)", subscription.log_context)

    def secret_changed(self, secret: Mapping[str, Any], *, deleted: bool) -> None:
        """Any Secret event: drift of an owned Secret, or a credentials Secret (re)appearing."""
        metadata = secret.get("metadata", {})
        ref = (metadata.get("namespace", ""), metadata.get("name", ""))
        for subscriber in self._by_credentials.get(ref, ()):
            self.scheduler.schedule(subscriber, self._clock())
        for named_by in self._by_secret.get(ref, ()):
            subscription = self._subscriptions.get(named_by)
            if subscription is None:
                continue
            if deleted or self._secret_drifted(subscription, secret):
                self.scheduler.schedule(named_by, self._clock())

    def paused(self) -> None:
        """Another replica serves now: only it may speak for the TokenRequests in metrics."""
        for subscription in self._subscriptions.values():
            metrics.forget_token_request(subscription.namespace, subscription.name)

    def resume_after_pause(self) -> None:
        """This replica takes over again: what it learnt before its pause may be stale.

        Meanwhile the active replica refreshed tokens (into the Secrets), changed
        statuses, and saw deletions that no watch will replay here. Every known
        TokenRequest is re-read before it is served again, and its token comes
        from its Secret where that is still good, as after a restart.
        """
        now = self._clock()
        for subscription in self._subscriptions.values():
            subscription.stale = True
            if subscription.key is not None:
                self._drop_from_key(subscription.key, subscription.ref)
                subscription.key = None
            self.scheduler.schedule(subscription.ref, now)
        logger.info("Resuming after a pause: %d TokenRequests to re-read", len(self._subscriptions))

    def is_interesting_secret(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._by_credentials or (namespace, name) in self._by_secret

    # Subscriptions and indexes

    def _learn(self, body: Mapping[str, Any]) -> Subscription:
        metadata = body.get("metadata", {})
        namespace, name = metadata["namespace"], metadata["name"]
        spec: TokenRequestSpec | None = None
        spec_error: str | None = None
        try:
            spec = parse_spec(
                body.get("spec") or {},
                name=name,
                namespace=namespace,
                default_cluster=self._settings.cluster_name,
            )
        except SpecError as error:
            spec_error = str(error)
        previous = self._subscriptions.get((namespace, name))
        if previous is not None and previous.uid != metadata["uid"]:
            # Deleted and created again under the same name: nothing carries over but the
            # lock, which keeps looks at one name one at a time.
            self._unindex(previous)
            self.scheduler.schedule(previous.ref, None)
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
        )
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
        return subscription

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
        named = [(subscription.namespace, subscription.spec.secret_name)]
        self._discard(self._by_secret, named, ref)
        if subscription.spec.credentials_secret:
            credentials = [(subscription.namespace, subscription.spec.credentials_secret)]
            self._discard(self._by_credentials, credentials, ref)

    @staticmethod
    def _discard(
        index: defaultdict[ObjectRef, set[ObjectRef]], at: list[ObjectRef], ref: ObjectRef
    ) -> None:
        for secret_ref in at:
            subscribers = index.get(secret_ref)
            if subscribers is not None:
                subscribers.discard(ref)
                if not subscribers:
                    del index[secret_ref]

    def _drop_from_key(self, key: CacheKey, ref: ObjectRef) -> None:
        subscribers = self._by_key.get(key)
        if subscribers is None:
            return
        subscribers.discard(ref)
        self._cache.unsubscribe(key, ref)  # its refresh_before no longer counts for the key
        if not subscribers:
            del self._by_key[key]
            self._cache.forget(key)  # nobody needs this token any more

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
        return not is_owned_by(secret, subscription.uid)

    # The work

    async def _scheduled(self, ref: ObjectRef) -> None:
        subscription = self._subscriptions.get(ref)
        if subscription is not None:
            await self._sync(subscription)

    async def _credentials(self, subscription: Subscription) -> ClientCredentials:
        assert subscription.spec is not None
        if subscription.spec.credentials_secret is None:
            # Read afresh each time: a mounted Secret may have been rotated in place.
            return await asyncio.to_thread(operator_identity, self._settings, self._environ)
        secret = await self._kube.read_secret(
            subscription.namespace, subscription.spec.credentials_secret
        )
        return credentials_from_secret(
            None if secret is None else (secret.get("data") or {}),
            namespace=subscription.namespace,
            name=subscription.spec.credentials_secret,
            policy=self._endpoint_policy,
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
            seal_for=lambda token: key.seal(credentials.client_secret, token),
        )
        if token is not None:
            REDACTOR.register(token.value)
            self._cache.seed(key, token)
            logger.info(
                "%s reusing the unexpired token found in its Secret", subscription.log_context
            )

    async def _sync(self, subscription: Subscription) -> None:
        async with subscription.lock:
            if self._subscriptions.get(subscription.ref) is not subscription:
                return  # replaced by a newer version of the object, or deleted meanwhile
            try:
                await self._sync_locked(subscription)
            except KubeError as error:
                # Not Kopf's to retry: it would call the token endpoint again on its own
                # schedule. The token already fetched stays cached for the next look.
                await self._api_failed(subscription, error)
            except Exception:
                # A bug must not silently end this TokenRequest's refreshes: look again later.
                logger.exception("%s look failed unexpectedly", subscription.log_context)
                subscription.api_failures += 1
                self.scheduler.reschedule(subscription.ref, self._retry_at(subscription))
            else:
                subscription.api_failures = 0

    def _current(self, subscription: Subscription) -> bool:
        """Still the object's latest version (not deleted or replaced during an await)."""
        return self._subscriptions.get(subscription.ref) is subscription

    async def _sync_locked(self, subscription: Subscription) -> None:
        if subscription.stale:
            await self._relearn(subscription)
            return
        if subscription.spec is None:
            await self._publish(
                subscription,
                token=None,
                refresh_at=None,
                failure=Failure(INVALID_SPEC, subscription.spec_error or "invalid spec"),
                failures=0,
                failed_at=None,
                outcome=None,
            )
            self.scheduler.reschedule(subscription.ref, None)
            return
        # Read once per look: for the conflict check, the seeding and the write.
        existing = await self._kube.read_secret(
            subscription.namespace, subscription.spec.secret_name
        )
        if existing is not None and not is_owned_by(existing, subscription.uid):
            # Nothing could be delivered: no token is fetched for it. A foreign Secret is not
            # watched (only owned ones are): each look for it to be gone is one GET, on the
            # backoff schedule (5 s doubling to 5 min).
            subscription.conflicts += 1
            await self._publish(
                subscription,
                token=None,
                refresh_at=None,
                failure=self._conflict_failure(subscription),
                failures=0,
                failed_at=None,
                outcome=WriteOutcome.CONFLICT,
            )
            backoff = self._retry.backoff(failures=subscription.conflicts, jitter_fraction=0.5)
            self.scheduler.reschedule(subscription.ref, self._clock() + backoff)
            return
        subscription.conflicts = 0
        try:
            credentials = await self._credentials(subscription)
        except CredentialsError as error:
            await self._credentials_failed(subscription, error)
            return
        REDACTOR.register(credentials.client_secret)
        if not client_id_shown(credentials.client_id):
            REDACTOR.register(credentials.client_id)  # perhaps a secret in the wrong key
        if not self._current(subscription):
            return
        subscription.credentials_failures = 0
        subscription.credentials_failed_at = None
        key = CacheKey.for_credentials(credentials, subscription.spec.scope)
        if key != subscription.key:
            # Seed only on the first look since the operator started: a key that changes
            # later means a new identity (or scope), and the Secret holds the token of the
            # old one, which must never be served as the new identity's token.
            first_look = subscription.key is None
            if subscription.key is not None:
                self._drop_from_key(subscription.key, subscription.ref)
            subscription.key = key
            self._by_key[key].add(subscription.ref)
            if first_look:
                self._seed_from_secret(subscription, key, credentials, existing)
        # The shared token is refreshed at the latest point its subscribers allow.
        self._cache.subscribe(key, subscription.ref, subscription.spec.refresh_before)
        result = await self._cache.get(
            credentials,
            subscription.spec.scope,
            refresh_before=subscription.spec.refresh_before,
        )
        metrics.record_cache_lookup(fetched=result.fetched)
        if not self._current(subscription):
            if result.fetched and result.token is not None:
                self._fan_out(key, subscription.ref)  # the others still want it
            return
        if result.token is not None:
            REDACTOR.register(result.token.value)
        if result.fetched:
            self._log_fetch(subscription, result)
            if result.token is not None:
                self._fan_out(key, subscription.ref)
        await self._deliver(subscription, result, credentials, existing)

    async def _relearn(self, subscription: Subscription) -> None:
        """After a pause: learn the object as it is now (the active replica handled its
        changes, so Kopf will not replay them here), or forget it if it went away."""
        current = await self._kube.read_token_request(subscription.namespace, subscription.name)
        if not self._current(subscription):
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
        for ref in self._by_key.get(key, ()):
            if ref != origin:
                self.scheduler.schedule(ref, now)

    def _log_fetch(self, subscription: Subscription, result: CacheResult) -> None:
        if result.token is not None and result.error is None:
            logger.info(
                "%s token obtained, expires %s",
                subscription.log_context,
                result.token.expires_at.isoformat(),
            )
        elif result.error is not None:
            reason = _failure_from(result.error).reason
            metrics.record_refresh_failure(subscription.namespace, subscription.name, reason=reason)
            logger.warning(
                "%s token request failed: reason=%s attempts=%d%s",
                subscription.log_context,
                reason,
                result.failures,
                _failure_fields(result.error),
            )

    async def _credentials_failed(
        self, subscription: Subscription, error: CredentialsError
    ) -> None:
        now = self._clock()
        subscription.credentials_failures += 1
        subscription.credentials_failed_at = now
        metrics.record_refresh_failure(
            subscription.namespace, subscription.name, reason=error.reason
        )
        logger.warning(
            "%s credentials unusable: reason=%s attempts=%d",
            subscription.log_context,
            error.reason,
            subscription.credentials_failures,
        )
        # Whatever token the Secret already holds still serves until it expires.
        token = None
        if subscription.key is not None:
            token = self._cache.peek(subscription.key).token
        await self._publish(
            subscription,
            token=token,
            refresh_at=None,
            failure=_failure_from(error),
            failures=subscription.credentials_failures,
            failed_at=now,
            outcome=None,
        )
        retry_at = self._retry.next_attempt_at(
            now=now,
            failures=subscription.credentials_failures,
            error=error,
            jitter_fraction=0.5,
        )
        if error.reason == CREDENTIALS_MISSING:  # a look only reads the Secret: cheap, so
            # it is found on the backoff schedule (unlabelled Secrets are not watched).
            retry_at = now + self._retry.backoff(
                failures=subscription.credentials_failures, jitter_fraction=0.5
            )
        # The watch on an opted-in credentials Secret brings a fix sooner; this is the net.
        wake = min(retry_at, token.expires_at) if token else retry_at
        self.scheduler.reschedule(subscription.ref, wake)

    async def _api_failed(self, subscription: Subscription, error: KubeError) -> None:
        """The API server refused a read or write: report it, keep the token, try again."""
        now = self._clock()
        subscription.api_failures += 1
        writing_secret = error.action.startswith(("create Secret", "replace Secret"))
        reason = SECRET_WRITE_FAILED if writing_secret else KUBERNETES_API_ERROR
        metrics.record_refresh_failure(subscription.namespace, subscription.name, reason=reason)
        logger.warning(
            "%s Kubernetes API call failed: reason=%s attempts=%d %s",
            subscription.log_context,
            reason,
            subscription.api_failures,
            error,
        )
        # The error text is the action, the HTTP status and its reason phrase: never a body.
        if writing_secret:
            hint = "check the operator's RBAC, admission policies and quotas for Secrets here"
        else:
            hint = "retrying with backoff"
        in_secret: WriteOutcome | None = WriteOutcome.UNCHANGED  # read back: it is there
        try:
            token = await self._token_in_secret(subscription)
        except KubeError:
            # The Secret cannot be read either: assume what was last delivered is still
            # there rather than turn Ready False on an API blip.
            token = self._cache.peek(subscription.key).token if subscription.key else None
            in_secret = None
        try:
            await self._publish(
                subscription,
                token=token,
                refresh_at=None,
                failure=Failure(reason, f"{error}; {hint}"),
                failures=subscription.api_failures,
                failed_at=now,
                outcome=in_secret if token is not None else None,
            )
        except KubeError as status_error:
            logger.warning("%s status not written: %s", subscription.log_context, status_error)
        retry_at = self._retry_at(subscription)
        wake = min(retry_at, token.expires_at) if token else retry_at
        self.scheduler.reschedule(subscription.ref, wake)

    def _retry_at(self, subscription: Subscription) -> datetime:
        return self._clock() + self._retry.backoff(
            failures=subscription.api_failures,
            jitter_fraction=random.random(),  # noqa: S311 (spreads retries; not a secret)
        )

    async def _token_in_secret(self, subscription: Subscription) -> AccessToken | None:
        """What the workload reads now: the unexpired token in the owned Secret, if any."""
        if subscription.spec is None:
            return None
        secret = await self._kube.read_secret(subscription.namespace, subscription.spec.secret_name)
        if secret is None:
            return None
        return token_from_secret(
            secret,
            owner_uid=subscription.uid,
            scope=subscription.spec.scope,
            now=self._clock(),
            seal_for=None,  # what the workload reads now, whoever wrote it
        )

    @staticmethod
    def _conflict_failure(subscription: Subscription) -> Failure:
        assert subscription.spec is not None
        return Failure(
            SECRET_CONFLICT,
            f"Secret {subscription.spec.secret_name} exists and is not owned by this "
            "TokenRequest; it is left untouched. Delete it or choose another spec.secretName",
        )

    async def _deliver(
        self,
        subscription: Subscription,
        result: CacheResult,
        credentials: ClientCredentials,
        existing: Mapping[str, Any] | None,
    ) -> None:
        assert subscription.spec is not None
        outcome: WriteOutcome | None = None
        if result.token is not None:
            desired = render_secret(
                owner=subscription.owner,
                secret_name=subscription.spec.secret_name,
                scope=subscription.spec.scope,
                token=result.token,
                seal=result.key.seal(credentials.client_secret, result.token),
            )
            outcome = await write_secret(
                self._kube, desired=desired, owner_uid=subscription.uid, existing=existing
            )
            if outcome is not WriteOutcome.CONFLICT and subscription.cleanup_pending:
                # Only now: the workload keeps its old Secret until the new one holds a token.
                await self._remove_previous_secrets(subscription)
                subscription.cleanup_pending = False
        failure: Failure | None = None
        if outcome is WriteOutcome.CONFLICT:  # created by someone else since the look's read
            failure = self._conflict_failure(subscription)
        elif result.error is not None:
            failure = _failure_from(result.error)
        in_secret = result.token if outcome is not WriteOutcome.CONFLICT else None
        await self._publish(
            subscription,
            token=in_secret,
            # While refreshes fail, the next refresh is the next attempt, not the missed point.
            refresh_at=result.next_attempt_at if result.error is not None else result.refresh_at,
            failure=failure,
            failures=result.failures if result.error is not None else 0,
            failed_at=result.last_failure_at,
            outcome=outcome,
        )
        self.scheduler.reschedule(subscription.ref, self._next_wake(result, outcome))

    def _next_wake(self, result: CacheResult, outcome: WriteOutcome | None) -> datetime:
        candidates: list[datetime] = []
        if result.error is None and result.refresh_at is not None:
            candidates.append(result.refresh_at)
        if result.next_attempt_at is not None:
            candidates.append(result.next_attempt_at)
        if result.token is not None:
            candidates.append(result.token.expires_at)  # Ready must turn False on time
        if outcome is WriteOutcome.CONFLICT or not candidates:
            # A watch event (the Secret's deletion) wakes us sooner; this is the safety net,
            # also for an answer that left nothing to wait for (a token born expired).
            candidates.append(self._clock() + self._retry.maximum)
        return min(candidates)

    async def _publish(
        self,
        subscription: Subscription,
        *,
        token: AccessToken | None,
        refresh_at: datetime | None,
        failure: Failure | None,
        failures: int,
        failed_at: datetime | None,
        outcome: WriteOutcome | None,
    ) -> None:
        now = self._clock()
        spec = subscription.spec
        observation = Observation(
            generation=subscription.generation,
            scope=spec.scope if spec else None,
            secret_name=spec.secret_name if spec else subscription.name,
            token=token if token is not None and token.expires_at > now else None,
            refresh_at=refresh_at,
            failure=failure,
            failed_attempts=failures,
            last_failure_at=failed_at,
            now=now,
        )
        previous = subscription.status
        desired = build_status(observation, previous)
        written = outcome in (WriteOutcome.CREATED, WriteOutcome.UPDATED)
        # Also when the Secret already held it (UNCHANGED): the look that wrote it may have
        # failed on the status write, and its event must not be lost with it.
        delivered = written or outcome is WriteOutcome.UNCHANGED
        new_token = (
            delivered
            and desired.get("expiresAt") is not None
            and previous.get("expiresAt") != desired.get("expiresAt")
        )
        events = transition_events(
            previous=previous,
            desired=desired,
            new_token_written=new_token,
            secret_restored=written and not new_token,
        )
        if written and not new_token:
            logger.info("%s Secret restored after drift", subscription.log_context)
        if status_changed(previous, desired):
            found = await self._kube.patch_token_request_status(
                subscription.namespace, subscription.name, desired
            )
            if not found:
                # Deleted without a DELETED event reaching us (a watch gap): stop serving it.
                self.forget(subscription.namespace, subscription.name, subscription.uid)
                return
            subscription.status = desired
        for event in events:
            await self._kube.create_event(
                subscription.namespace,
                event_body(
                    namespace=subscription.namespace,
                    name=subscription.name,
                    uid=subscription.uid,
                    event=event,
                    now=now,
                ),
            )
        if not self._current(subscription):
            return  # deleted meanwhile: its metrics are gone and must stay gone
        metrics.observe_token_request(
            subscription.namespace,
            subscription.name,
            ready=observation.token is not None,
            expires_at=observation.token.expires_at if observation.token else None,
        )
