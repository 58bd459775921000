"""The names the operator shares with the cluster: its API, labels, annotations, reasons.

Each is defined here once and imported everywhere else. No imports of ours: the
lowest layer, so that any module may use these without pulling in another.
"""

from __future__ import annotations

from typing import Any

# A JSON object as the Kubernetes API sends and takes it.
JsonObject = dict[str, Any]

# The TokenRequest API.
GROUP = "m2m.dev"
VERSION = "v1alpha1"
PLURAL = "tokenrequests"
KIND = "TokenRequest"
API_VERSION = f"{GROUP}/{VERSION}"

# Labels.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "m2m-token-operator"
TOKEN_REQUEST_LABEL = "m2m.dev/token-request"
# On a credentials Secret (value "true"): its changes wake the TokenRequests that name it.
CREDENTIALS_LABEL = "m2m.dev/credentials"

# Annotations on the Secrets the operator writes.
EXPIRES_AT_ANNOTATION = "m2m.dev/expires-at"
# Not in the contract's list but harmless to users: the issue time lets a
# restarted operator compute the same refresh point without calling the endpoint.
ISSUED_AT_ANNOTATION = "m2m.dev/issued-at"
# An HMAC keyed by the operator's own seal key (seal.SealKey, from the seal-key Secret)
# over identity, scope, token and times (CacheKey.seal): after a restart the token is
# reused only if it verifies, so an edited or planted token, or one issued to another
# identity, is never served.
SEAL_ANNOTATION = "m2m.dev/seal"
# Which labels and annotations on the Secret came from spec.secretTemplate (compact JSON,
# {"labels": [...], "annotations": [...]}, sorted), present only while the template has
# any. A key removed from the template is then removed from the Secret, while the keys
# other tools added (never in the template) stay, also across operator restarts.
TEMPLATE_KEYS_ANNOTATION = "m2m.dev/template-keys"
# Which cache entry (identity and scope) the token belongs to: SealKey.key_id, an HMAC
# without the token. A start picks one Secret per key by it, from metadata alone, and
# reads that Secret's data to seed the key. Written with each token; a Secret without it
# (written by an older version) is not rewritten for it.
KEY_ID_ANNOTATION = "m2m.dev/key-id"

# The Secret holding the restart seal's key (seal.py), unless M2M_SEAL_KEY_SECRET names
# another: in the operator's own namespace, read from the in-cluster file (or POD_NAMESPACE),
# else the default namespace.
DEFAULT_SEAL_SECRET_NAME = "m2m-token-operator-seal-key"
DEFAULT_SEAL_NAMESPACE = "m2m-token-operator"
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# The audience of a federated identity's ServiceAccount token: Entra's token exchange.
DEFAULT_FEDERATION_AUDIENCE = "api://AzureADTokenExchange"

# Status condition types.
READY = "Ready"
DEGRADED = "Degraded"

# Condition reasons: one per failure class, CamelCase, as the API conventions ask.
TOKEN_ISSUED = "TokenIssued"
REFRESH_SUCCEEDED = "RefreshSucceeded"
PENDING = "Pending"
INVALID_SPEC = "InvalidSpec"
CREDENTIALS_MISSING = "CredentialsMissing"
CREDENTIALS_INVALID = "CredentialsInvalid"
ENDPOINT_NOT_ALLOWED = "EndpointNotAllowed"
OPERATOR_IDENTITY_NOT_ALLOWED = "OperatorIdentityNotAllowed"
OPERATOR_NAMESPACE_NOT_SERVED = "OperatorNamespaceNotServed"
CREDENTIALS_REJECTED = "CredentialsRejected"
SCOPE_REJECTED = "ScopeRejected"
ENDPOINT_UNAVAILABLE = "EndpointUnavailable"
THROTTLED = "Throttled"
SECRET_CONFLICT = "SecretConflict"
SECRET_WRITE_FAILED = "SecretWriteFailed"
KUBERNETES_API_ERROR = "KubernetesAPIError"
INTERNAL_ERROR = "InternalError"  # an unexpected exception ended the look: a bug
PERMISSION_DENIED = "PermissionDenied"  # the operator lacks a permission the look needs
# Event-only reasons.
TOKEN_REFRESHED = "TokenRefreshed"
SECRET_RESTORED = "SecretRestored"
TOKEN_EXPIRED = "TokenExpired"
NO_APP_ROLES = "NoAppRoles"
REFRESH_REQUESTED = "RefreshRequested"
