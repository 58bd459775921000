"""Kubernetes API plumbing: the typed API, call priority, the event queue, reflectors
(list + watch), the Secret and TokenRequest watches, peering, and the API-backed credentials
(workload identity federation).

May import `tokens` and `api`; never `config`, `reconcile`, `app` or `cli`.
"""
