"""From a TokenRequest to its Secret and status: registry, scheduler, decision, reconciler,
the Secret and status rendering, the restart seal, metrics.

May import `config`, `kube`, `tokens` and `api`; never `app` or `cli`.
"""
