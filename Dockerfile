# syntax=docker/dockerfile:1
#
# m2m-token-operator image. Every Python package is hash-pinned:
#   requirements.lock        runtime dependencies (from pyproject.toml [project])
#   requirements-build.lock  setuptools/wheel that build our own wheel
#                            (from pyproject.toml [build-system])
# Regenerate both with pip-tools, see docs/operations.md ("Upgrades").
#
# The base image is pinned by exact tag. Pin it by digest in your build
# (python:3.11.15-slim-bookworm@sha256:...) once you can pull it: a tag can be
# re-pushed, a digest cannot.
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# Build tools in their own venv, so they never reach the runtime image.
COPY requirements-build.lock ./
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps --only-binary=:all: -r requirements-build.lock

# The runtime venv has no pip and no setuptools (Python 3.11's ensurepip would
# add an old setuptools); the build venv's pip installs into it (--python).
# Runtime dependencies: wheels only (the slim image has no compiler and needs
# none), exactly the pinned set (--no-deps: nothing outside the lock gets in).
COPY requirements.lock ./
RUN python -m venv --without-pip /opt/venv \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --require-hashes --no-deps --only-binary=:all: -r requirements.lock

# The operator itself, built with the pinned setuptools (no build isolation, so
# pip downloads no unpinned build backend), installed without dependencies.
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps /tmp/dist/*.whl \
 && /opt/venv/bin/m2m-token-operator --help

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="m2m-token-operator" \
      org.opencontainers.image.description="Keeps OAuth 2.0 client-credentials access tokens fresh in Kubernetes Secrets" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Only the venv: no pip, no cache, no sources, no build tools.
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
# 8080 metrics, 8081 liveness (Kopf)
EXPOSE 8080 8081
ENTRYPOINT ["m2m-token-operator"]
CMD ["--all-namespaces", "--peering=m2m-token-operator", "--liveness=http://0.0.0.0:8081/healthz"]
