"""Local development environment: a real control plane and a real token server.

The operator's behaviour against Kubernetes (owner references, garbage
collection, RBAC, the TokenRequest subresource) and against an OAuth 2.0 token
endpoint is only trustworthy when it is tested against the real things. This
package builds and runs them on 127.0.0.1, with no Docker and no cluster:

- `devenv.binaries` builds pinned etcd, kube-apiserver, kube-controller-manager
  and kubectl once per machine and caches them outside the repository;
- `devenv.controlplane` runs them as a throwaway control plane;
- `devenv.tokenserver` runs navikt's mock-oauth2-server as the token endpoint.
"""
