"""The operator's settings, read from the environment once and checked at start.

Stands above `tokens`, `kube` and `api` (it builds their policies from the environment) and
below `reconcile` and `app`, which receive a `Settings`.
"""
