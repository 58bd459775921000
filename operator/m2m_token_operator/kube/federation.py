"""Workload identity federation: a ServiceAccount's own token proves the application.

No secret is stored anywhere. The ServiceAccount names its Entra application
(annotation `azure.workload.identity/client-id`, the Azure Workload Identity
convention); for each token request the operator mints a token of that
ServiceAccount with the Kubernetes TokenRequest API and presents it as the
client assertion, which Entra checks against the application's federated
credential (issuer = the cluster's service account issuer, subject
`system:serviceaccount:<namespace>:<name>`).

A right to mint a ServiceAccount's tokens is a right to act as it, so the
operator holds none cluster-wide: a namespace grants it with a RoleBinding to
the ClusterRole `m2m-token-operator:federation`. Without it the API server
answers 403, which becomes `FederationNotPermitted`, held like a rejected
credential until a person acts.

The minted token is never cached, stored or logged: it is made on the
token client's assertion thread right before the request that carries it, and
registered with the log redactor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from m2m_token_operator.api.constants import (
    CREDENTIALS_INVALID,
    CREDENTIALS_MISSING,
    KUBERNETES_API_ERROR,
)
from m2m_token_operator.kube.kube_api import KubeError, NotFound
from m2m_token_operator.tokens.credentials import (
    FEDERATED,
    ClientCredentials,
    CredentialsError,
    EndpointPolicy,
    check_endpoint_url,
)
from m2m_token_operator.tokens.model import TokenEndpointError
from m2m_token_operator.tokens.redaction import REDACTOR

logger = logging.getLogger(__name__)

CLIENT_ID_ANNOTATION = "azure.workload.identity/client-id"
TENANT_ID_ANNOTATION = "azure.workload.identity/tenant-id"
TOKEN_ENDPOINT_ANNOTATION = "m2m.dev/token-endpoint"
FEDERATION_CLUSTER_ROLE = "m2m-token-operator:federation"
FEDERATION_NOT_PERMITTED = "FederationNotPermitted"
# The shortest lifetime the TokenRequest API allows: the token is used at once.
EXPIRATION_SECONDS = 600
# A tenant is a GUID or a verified domain name; nothing that could change the URL's path.
_TENANT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")

# (namespace, name, audience, expiration seconds) -> (token, expirationTimestamp)
Mint = Callable[..., tuple[str, str | None]]


class FederationNotPermitted(TokenEndpointError):
    """The namespace has not granted the operator the right to mint its ServiceAccount's tokens."""

    reason = FEDERATION_NOT_PERMITTED
    permanent = True


class ServiceAccountGone(TokenEndpointError):
    """The ServiceAccount was deleted between reading it and minting its token."""

    reason = CREDENTIALS_MISSING
    permanent = True


class ServiceAccountTokenFailed(TokenEndpointError):
    """The API server failed to mint the token (5xx, unreachable): retried with backoff."""

    reason = KUBERNETES_API_ERROR
    permanent = False


def _lower(error: Exception) -> str:
    text = str(error)
    return text[:1].lower() + text[1:]


def _annotation(annotations: Mapping[str, Any], name: str) -> str | None:
    value = annotations.get(name)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def token_endpoint_for(
    annotations: Mapping[str, Any],
    *,
    source: str,
    policy: EndpointPolicy,
    default_endpoint: str | None,
    allow_insecure_http: bool,
) -> str:
    """The endpoint annotation (allow-listed), else the tenant's Entra endpoint, else ours."""
    endpoint = _annotation(annotations, TOKEN_ENDPOINT_ANNOTATION)
    if endpoint is not None:
        try:
            check_endpoint_url(endpoint, allow_insecure_http=True)
            policy.check(endpoint)
        except CredentialsError as error:
            raise CredentialsError(
                f"{source}: annotation {TOKEN_ENDPOINT_ANNOTATION}: {_lower(error)}",
                reason=error.reason,
            ) from None
        return endpoint
    tenant = _annotation(annotations, TENANT_ID_ANNOTATION)
    if tenant is not None:
        if not _TENANT.fullmatch(tenant):
            raise CredentialsError(
                f"{source}: annotation {TENANT_ID_ANNOTATION} is not a tenant id: use the"
                " tenant's GUID or its domain name",
                reason=CREDENTIALS_INVALID,
            )
        return f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
    if default_endpoint is None:
        raise CredentialsError(
            f"{source} names no token endpoint (annotation {TOKEN_ENDPOINT_ANNOTATION} or"
            f" {TENANT_ID_ANNOTATION}) and the operator has none of its own: set one of the"
            " annotations",
            reason=CREDENTIALS_MISSING,
        )
    try:
        check_endpoint_url(default_endpoint, allow_insecure_http=allow_insecure_http)
    except CredentialsError as error:
        raise CredentialsError(
            f"{source}: the operator's own token endpoint: {_lower(error)}", reason=error.reason
        ) from None
    return default_endpoint


def federated_identity(
    account: Mapping[str, Any] | None,
    *,
    namespace: str,
    name: str,
    policy: EndpointPolicy,
    default_endpoint: str | None,
    allow_insecure_http: bool,
    audience: str,
    mint: Mint,
) -> ClientCredentials:
    """The identity of a ServiceAccount (None: it does not exist), proven by minted tokens.

    `mint(namespace, name, audience=..., expiration_seconds=...)` is the blocking
    Kubernetes call (`KubeApi.mint_service_account_token`); it runs when the token
    client asks for the assertion, on its assertion thread.
    """
    source = f"ServiceAccount {namespace}/{name}"
    if account is None:
        raise CredentialsError(
            f"{source} not found: create it, annotated with {CLIENT_ID_ANNOTATION} naming the"
            " Entra application whose federated credential trusts it",
            reason=CREDENTIALS_MISSING,
        )
    metadata = account.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    client_id = _annotation(annotations, CLIENT_ID_ANNOTATION)
    if client_id is None:
        raise CredentialsError(
            f"{source} has no annotation {CLIENT_ID_ANNOTATION}: annotate it with the client id"
            " of the Entra application whose federated credential trusts this ServiceAccount",
            reason=CREDENTIALS_MISSING,
        )
    endpoint = token_endpoint_for(
        annotations,
        source=source,
        policy=policy,
        default_endpoint=default_endpoint,
        allow_insecure_http=allow_insecure_http,
    )
    uid = str(metadata.get("uid") or "")

    def assertion() -> str:
        try:
            token, expires = mint(
                namespace, name, audience=audience, expiration_seconds=EXPIRATION_SECONDS
            )
        except NotFound:
            raise ServiceAccountGone(
                f"{source} not found when minting its token: create it again"
            ) from None
        except KubeError as error:
            if error.status == 403:
                raise FederationNotPermitted(
                    f"The operator may not create tokens for {source}: a namespace admin must"
                    f" grant it with a RoleBinding in {namespace} to the ClusterRole"
                    f" {FEDERATION_CLUSTER_ROLE} for the operator's ServiceAccount (see"
                    " examples/federation-rolebinding.yaml)"
                ) from None
            raise ServiceAccountTokenFailed(
                f"Minting a token for {source} failed ({error}); it is retried with backoff"
            ) from None
        REDACTOR.register(token)
        # The API server may shorten the lifetime asked for; it is used at once anyway.
        logger.debug("minted a token of %s for %s, expires %s", source, audience, expires)
        return token

    return ClientCredentials(
        token_endpoint=endpoint,
        client_id=client_id,
        source=source,
        method=FEDERATED,
        material=f"{namespace}/{name}/{uid}".encode(),
        client_assertion=assertion,
        # A ServiceAccount holds no secret: the seal can only bind the token to its identity.
        seal_secret=f"serviceaccount:{namespace}/{name}/{uid}",
    )
