"""m2m-token-operator: OAuth 2.0 client-credentials tokens delivered to workloads as Secrets."""

__version__ = "0.1.0"
