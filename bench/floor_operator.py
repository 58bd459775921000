"""The floor: the least work any operator must do per TokenRequest, as a yardstick.

`scale_bench.py` runs this and m2m-token-operator on the same control plane,
one after the other, and prints our figures as ratios to these. It does what a
new user would write in an afternoon, and nothing more:

- one asyncio loop, one aiohttp session (HTTP/1.1 keep-alive, as Kopf uses);
- one cluster-wide watch of TokenRequests (a list for its resourceVersion first);
- per TokenRequest seen without Ready=True: one Secret create, one status merge
  patch (the Ready condition and the fields `kubectl get tokreq` prints), one
  Event `TokenIssued`;
- one call to the token endpoint per scope, cached for the process's life
  (concurrent TokenRequests of one scope wait for the same call).

No refresh, no credentials Secrets, no retries, no deletion, no restart
handling (a second start would meet its own Secrets with 409s), no metrics.
It runs as the operator's ServiceAccount (its kubeconfig), so every request
goes through the same authentication, RBAC and admission policy as ours.

Environment: KUBECONFIG (a token kubeconfig as `ControlPlane.service_account_kubeconfig`
writes), AZURE_APP_CLIENT_ID, AZURE_APP_CLIENT_SECRET, AZURE_OPENID_CONFIG_TOKEN_ENDPOINT.
Prints `floor: watching` once the watch is open, and one line per failure.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import yaml

GROUP, VERSION, PLURAL = "m2m.dev", "v1alpha1", "tokenrequests"
COMPONENT = "m2m-token-floor"
HOSTNAME = socket.gethostname()[:128]


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _ready(body: dict[str, Any]) -> bool:
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _roles(token: str) -> list[str]:
    """The app roles of a JWT (for the Roles column); [] when it has none or is no JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return [str(role) for role in claims.get("roles") or []]
    except (IndexError, ValueError, AttributeError):
        return []


class Token:
    def __init__(self, value: str, token_type: str, issued: datetime, expires_in: int) -> None:
        self.value = value
        self.token_type = token_type
        self.expires_at = issued + timedelta(seconds=expires_in)
        self.refresh_at = issued + timedelta(seconds=expires_in * 2 // 3)
        self.roles = _roles(value)
        self.issued_at = issued


class Floor:
    def __init__(self, session: aiohttp.ClientSession, server: str, token: str) -> None:
        self.session = session
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.tokens: dict[str, asyncio.Future[Token]] = {}
        self.seen: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.identity = {
            "client_id": os.environ["AZURE_APP_CLIENT_ID"],
            "client_secret": os.environ["AZURE_APP_CLIENT_SECRET"],
            "grant_type": "client_credentials",
        }
        self.token_endpoint = os.environ["AZURE_OPENID_CONFIG_TOKEN_ENDPOINT"]

    async def _fetch(self, scope: str) -> Token:
        form = {**self.identity, "scope": scope}
        async with self.session.post(self.token_endpoint, data=form) as response:
            answer = await response.json(content_type=None)
            if response.status != 200:
                raise RuntimeError(f"token endpoint answered {response.status} for {scope}")
        return Token(
            answer["access_token"],
            answer.get("token_type", "Bearer"),
            datetime.now(UTC),
            int(answer["expires_in"]),
        )

    async def token(self, scope: str) -> Token:
        future = self.tokens.get(scope)
        if future is None:
            future = self.tokens[scope] = asyncio.ensure_future(self._fetch(scope))
        try:
            return await asyncio.shield(future)
        except Exception:
            self.tokens.pop(scope, None)  # the next TokenRequest of this scope tries again
            raise

    async def _send(self, method: str, path: str, body: Any, content_type: str) -> None:
        headers = {**self.headers, "Content-Type": content_type}
        async with self.session.request(
            method, self.server + path, data=json.dumps(body), headers=headers
        ) as response:
            await response.read()
            if response.status >= 300:
                raise RuntimeError(f"{method} {path}: HTTP {response.status}")

    async def serve(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        spec = obj.get("spec") or {}
        scope = spec["scope"]  # the bench's TokenRequests name a scope; targets are not floor
        secret_name = spec.get("secretName") or name
        token = await self.token(scope)
        expires = _time(token.expires_at)
        await self._send(
            "POST",
            f"/api/v1/namespaces/{namespace}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": secret_name,
                    "labels": {
                        "app.kubernetes.io/managed-by": "m2m-token-operator",
                        "m2m.dev/token-request": name,
                    },
                    "annotations": {"m2m.dev/expires-at": expires},
                    "ownerReferences": [
                        {
                            "apiVersion": f"{GROUP}/{VERSION}",
                            "kind": "TokenRequest",
                            "name": name,
                            "uid": uid,
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "data": {
                    "token": _b64(token.value),
                    "token-type": _b64(token.token_type),
                    "expires-at": _b64(expires),
                    "scope": _b64(scope),
                },
            },
            "application/json",
        )
        now = _time(datetime.now(UTC))
        generation = meta.get("generation", 1)
        message = f"Secret {secret_name} holds a token for {scope} valid until {expires}"
        await self._send(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            {
                "status": {
                    "observedGeneration": generation,
                    "scope": scope,
                    "secretName": secret_name,
                    "expiresAt": expires,
                    "refreshAt": _time(token.refresh_at),
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "TokenIssued",
                            "message": message,
                            "lastTransitionTime": now,
                            "observedGeneration": generation,
                        }
                    ],
                    "token": {
                        "roles": token.roles,
                        "issuedAt": _time(token.issued_at),
                        "expiresAt": expires,
                    },
                }
            },
            "application/merge-patch+json",
        )
        await self._send(
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{name}.", "namespace": namespace},
                "involvedObject": {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "TokenRequest",
                    "name": name,
                    "namespace": namespace,
                    "uid": uid,
                },
                "type": "Normal",
                "reason": "TokenIssued",
                "message": message,
                "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT,
                "reportingInstance": HOSTNAME,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            },
            "application/json",
        )

    def see(self, obj: dict[str, Any]) -> None:
        uid = obj["metadata"]["uid"]
        if uid in self.seen or _ready(obj):
            return
        self.seen.add(uid)
        task = asyncio.create_task(self._serve_logged(obj))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve_logged(self, obj: dict[str, Any]) -> None:
        try:
            await self.serve(obj)
        except Exception as error:
            meta = obj["metadata"]
            print(f"floor: {meta['namespace']}/{meta['name']}: {error}", flush=True)

    async def watch(self) -> None:
        collection = f"{self.server}/apis/{GROUP}/{VERSION}/{PLURAL}"
        version = ""
        announced = False
        while True:
            if not version:
                async with self.session.get(collection, headers=self.headers) as response:
                    listing = await response.json()
                for item in listing["items"]:
                    self.see(item)
                version = listing["metadata"]["resourceVersion"]
            params = {"watch": "true", "resourceVersion": version, "timeoutSeconds": "300"}
            async with self.session.get(
                collection, params=params, headers=self.headers, timeout=aiohttp.ClientTimeout()
            ) as response:
                if not announced:
                    print("floor: watching", flush=True)
                    announced = True
                async for line in response.content:
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        version = ""  # 410 Gone: list again
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.see(obj)


def _connection(kubeconfig: Path) -> tuple[str, str, ssl.SSLContext]:
    """Server, bearer token and TLS context of a token kubeconfig."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    context = ssl.create_default_context()
    if "certificate-authority" in cluster:
        context.load_verify_locations(cafile=cluster["certificate-authority"])
    elif "certificate-authority-data" in cluster:
        with tempfile.NamedTemporaryFile("wb", suffix=".crt") as ca:
            ca.write(base64.b64decode(cluster["certificate-authority-data"]))
            ca.flush()
            context.load_verify_locations(cafile=ca.name)
    return cluster["server"], user["token"], context


async def main() -> int:
    server, token, context = _connection(Path(os.environ["KUBECONFIG"]))
    connector = aiohttp.TCPConnector(ssl=context, limit=100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with aiohttp.ClientSession(connector=connector) as session:
        watcher = asyncio.create_task(Floor(session, server, token).watch())
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({watcher, stopping}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if watcher in done and watcher.exception() is not None:
            print(f"floor: watch failed: {watcher.exception()!r}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
