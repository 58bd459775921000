"""A stand-in operator for the harness smoke test: Kopf wiring and API writes, no business logic.

It does what the real operator does on the wire when a TokenRequest appears:
a Secret with a controller owner reference (through the ``kubernetes`` client's
validated models, so a missing uid would fail), a merge patch of the status
subresource, and a core v1 Event; the blocking client runs off Kopf's loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import kopf
import kubernetes

GROUP, VERSION, PLURAL = "m2m.dev", "v1alpha1", "tokenrequests"
SMOKE_TOKEN = "smoke-token-value"

logger = logging.getLogger("smoke_handlers")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # The CRD's status schema has no room for Kopf's own state: keep it in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="smoke.m2m.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="smoke.m2m.dev")
    settings.posting.enabled = False


@kopf.on.create(GROUP, VERSION, PLURAL)
async def created(body: kopf.Body, **_: Any) -> None:
    await asyncio.to_thread(write, dict(body))
    logger.info(
        "smoke: wrote the Secret and the status of %s/%s",
        body.metadata.namespace,
        body.metadata.name,
    )


def write(body: dict[str, Any]) -> None:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(client_configuration=configuration)  # honours KUBECONFIG
    with kubernetes.client.ApiClient(configuration) as api:
        core = kubernetes.client.CoreV1Api(api)
        custom = kubernetes.client.CustomObjectsApi(api)
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        secret_name = body["spec"].get("secretName") or f"{name}-token"
        owner = kubernetes.client.V1OwnerReference(
            api_version=body["apiVersion"],
            kind=body["kind"],
            name=name,
            uid=meta["uid"],
            controller=True,
            block_owner_deletion=True,
        )
        secret = kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(
                name=secret_name,
                labels={
                    "app.kubernetes.io/managed-by": "m2m-token-operator",
                    "m2m.dev/token-request": name,
                },
                owner_references=[owner],
            ),
            type="Opaque",
            data={"token": base64.b64encode(SMOKE_TOKEN.encode()).decode()},
        )
        core.create_namespaced_secret(namespace, secret)
        # The strategic merge patch the client sends for core objects by default.
        core.patch_namespaced_secret(
            secret_name, namespace, {"metadata": {"annotations": {"smoke": "patched"}}}
        )
        custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": {"secretName": secret_name, "observedGeneration": meta.get("generation")}},
        )
        core.create_namespaced_event(
            namespace,
            {
                "metadata": {"generateName": f"{name}."},
                "involvedObject": {
                    "apiVersion": body["apiVersion"],
                    "kind": body["kind"],
                    "name": name,
                    "namespace": namespace,
                    "uid": meta["uid"],
                },
                "reason": "SmokeWritten",
                "message": "the smoke handler wrote the Secret",
                "type": "Normal",
                "source": {"component": "smoke-handlers"},
            },
        )
