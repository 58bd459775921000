"""Acquiring tokens: the token model, credentials, the HTTP client, the cache, refresh timing.

Knows nothing of Kubernetes objects or of the reconciler: imports only `api` (never `kube`,
`config`, `reconcile`, `app` or `cli`). Log redaction lives here because the credentials and
the client register what must never be logged.
"""
