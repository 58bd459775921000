"""A real OAuth 2.0 token endpoint on 127.0.0.1: navikt's mock-oauth2-server.

The operator's contract is the client-credentials request on the wire, so the
end-to-end tests talk to a real server that parses the form, authenticates the
client, signs a JWT and answers in the OAuth 2.0 shape, errors included.
mock-oauth2-server does that for any issuer path, with a per-issuer token
lifetime that lets a refresh test see a token expire in seconds.

It runs behind `devenv.tokenfront.VerifyingFront`, which verifies client
assertions (private_key_jwt, workload identity federation) as Entra ID does and
passes everything else through: `base_url`, `port` and `token_endpoint()` are
the front's. Register clients with `register_jwk`, `register_federated` and
`register_secret`; `front.requests` records every token request it saw.

Its jars come from Maven Central through Maven (the only way to get them here)
and are cached under `<cache>/mock-oauth2-server/<version>/`.

What the server does with a client-credentials request, as configured here:

- `client_id` and a non-empty `client_secret` are required (any values);
  without a secret it answers 401 `invalid_client`;
- the JWT carries the requested scope in `aud` (a string), the client id in
  `sub` and `azp`, and `iss` = `<base>/<issuer>`; like an Entra ID token for a
  client the target granted an app role, `tid` = `TENANT_ID` and `roles` =
  `[ROLE]`, except at the issuer `noroles` (`NO_ROLES_ISSUER`), whose tokens
  carry no `roles` (a target that granted nothing: `NoAppRoles`);
- `expires_in` is the issuer's lifetime minus one second (3599 for 3600),
  because the server counts whole seconds from the JWT's `exp` down.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests

from devenv.cache import cache_dir, fill_once
from devenv.process import ManagedProcess, StartStop
from devenv.tokenfront import FEDERATION_AUDIENCE, JwksSource, VerifyingFront

__all__ = [
    "DEFAULT_ISSUER",
    "MOCK_OAUTH2_SERVER_VERSION",
    "NO_ROLES_ISSUER",
    "ROLE",
    "SHORT_ISSUER",
    "SHORT_TOKEN_EXPIRY",
    "TENANT_ID",
    "TokenServer",
    "TokenServerError",
    "ensure_classpath",
    "jwt_claims",
]

MOCK_OAUTH2_SERVER_VERSION = "6.0.2"
MAIN_CLASS = "no.nav.security.mock.oauth2.StandaloneMockOAuth2ServerKt"
# Pinned so that the fetch does not depend on whatever plugin version Maven resolves today.
_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

DEFAULT_ISSUER = "default"
SHORT_ISSUER = "short"
SHORT_TOKEN_EXPIRY = 20
DEFAULT_TOKEN_EXPIRY = 3600
NO_ROLES_ISSUER = "noroles"
ROLE = "access_as_application"
TENANT_ID = "local-tenant"

# Start-up is dominated by JIT warm-up of a short-lived test server: C1 only and
# the serial collector roughly halve it (3-4 s to 1.5 s here). -UsePerfData keeps
# the JVM from leaving /tmp/hsperfdata_* files behind when it is killed.
_JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xmx256m", "-XX:-UsePerfData")

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.m2m.devenv</groupId>
  <artifactId>token-server-classpath</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>no.nav.security</groupId>
      <artifactId>mock-oauth2-server</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


class TokenServerError(RuntimeError):
    """The token server could not be fetched or started; the message says why."""


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tool(name: str, purpose: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise TokenServerError(
            f"`{name}` is not on PATH; it is needed to {purpose} "
            "(install a JDK 17+ and Maven, e.g. `apt-get install openjdk-17-jdk-headless maven`)"
        )
    return found


def ensure_classpath(
    version: str = MOCK_OAUTH2_SERVER_VERSION, *, log: Callable[[str], None] = _print
) -> list[Path]:
    """Return mock-oauth2-server's runtime jars, fetching them with Maven on first use."""

    def fill(staging: Path) -> None:
        mvn = _tool("mvn", "fetch mock-oauth2-server from Maven Central")
        log(f"fetching mock-oauth2-server {version} and its dependencies with Maven")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="m2m-mvn-") as project:
            pom = Path(project) / "pom.xml"
            pom.write_text(_POM.format(version=version))
            result = subprocess.run(
                [
                    mvn,
                    "--batch-mode",
                    "--quiet",
                    "-f",
                    str(pom),
                    f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={staging}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            raise TokenServerError(
                f"Maven could not fetch no.nav.security:mock-oauth2-server:{version} "
                f"(exit {result.returncode}):\n{result.stdout[-4000:]}"
            )
        if not (staging / f"mock-oauth2-server-{version}.jar").is_file():
            raise TokenServerError("Maven succeeded but copied no mock-oauth2-server jar")
        log(f"fetched mock-oauth2-server {version} in {time.monotonic() - started:.1f}s")

    directory = fill_once(cache_dir() / "mock-oauth2-server" / version, fill)
    return sorted(directory.glob("*.jar"))


def server_config(token_expiry: Mapping[str, int]) -> dict[str, Any]:
    """mock-oauth2-server's JSON_CONFIG giving each issuer its token lifetime in seconds.

    Only a request-mapping callback can set a lifetime, and it replaces the
    default claims, so the claims the default callback would give a
    client-credentials token (scope as `aud`, client as `sub`) are restated.
    `${...}` is filled from the request's form parameters (and `clientId`).
    """
    return {
        "interactiveLogin": False,
        "httpServer": "NettyWrapper",
        "tokenCallbacks": [
            {
                "issuerId": issuer,
                "tokenExpiry": seconds,
                "requestMappings": [
                    {
                        "requestParam": "grant_type",
                        "match": "*",
                        "claims": {
                            "sub": "${clientId}",
                            "azp": "${clientId}",
                            "aud": ["${scope}"],
                            "tid": TENANT_ID,
                            **({} if issuer == NO_ROLES_ISSUER else {"roles": [ROLE]}),
                        },
                    }
                ],
            }
            for issuer, seconds in token_expiry.items()
        ],
    }


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified: tests only look at what the server put in."""
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TokenServer(StartStop):
    """mock-oauth2-server on 127.0.0.1 with a free port, as a context manager.

    Every issuer path works (`/<issuer>/token`); issuers named in `token_expiry`
    get that lifetime, others the server's default of 3600 s. By default the
    issuer `short` issues tokens for `SHORT_TOKEN_EXPIRY` (20) seconds, for
    refresh tests.
    """

    def __init__(
        self,
        *,
        token_expiry: Mapping[str, int] | None = None,
        version: str = MOCK_OAUTH2_SERVER_VERSION,
        startup_timeout: float = 60.0,
        log_dir: Path | None = None,
    ) -> None:
        self.token_expiry: dict[str, int] = (
            dict(token_expiry)
            if token_expiry is not None
            else {
                DEFAULT_ISSUER: DEFAULT_TOKEN_EXPIRY,
                SHORT_ISSUER: SHORT_TOKEN_EXPIRY,
                NO_ROLES_ISSUER: DEFAULT_TOKEN_EXPIRY,
            }
        )
        self.version = version
        self.startup_timeout = startup_timeout
        self.log_dir = log_dir
        self.port = 0  # the verifying front's, which clients talk to
        self.upstream_port = 0  # mock-oauth2-server's own
        self._process: ManagedProcess | None = None
        self._front: VerifyingFront | None = None
        self._issuer: tuple[str, JwksSource] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def front(self) -> VerifyingFront:
        if self._front is None:
            raise TokenServerError("token server not started")
        return self._front

    def register_jwk(self, client_id: str, public_jwk: Mapping[str, Any]) -> None:
        """`client_id` authenticates with private_key_jwt, verified with this public JWK."""
        self.front.register_jwk(client_id, public_jwk)

    def trust_issuer(self, issuer: str, jwks: JwksSource) -> None:
        """The default issuer of `register_federated`: e.g. the cluster's ServiceAccounts."""
        self._issuer = (issuer, jwks)

    def register_federated(
        self,
        client_id: str,
        subject: str,
        *,
        issuer: str | None = None,
        jwks: JwksSource | None = None,
        audience: str = FEDERATION_AUDIENCE,
    ) -> None:
        """`client_id` trusts tokens of `issuer` (keys from `jwks()`) for `subject`.

        Without `issuer`/`jwks`, those of `trust_issuer` (the e2e fixture `federation`
        sets the control plane's): subject `system:serviceaccount:<namespace>:<name>`.
        """
        if issuer is None or jwks is None:
            if self._issuer is None:
                raise TokenServerError("register_federated needs an issuer: call trust_issuer")
            issuer, jwks = issuer or self._issuer[0], jwks or self._issuer[1]
        self.front.register_federated(
            client_id, subject=subject, issuer=issuer, jwks=jwks, audience=audience
        )

    def register_secret(self, client_id: str, secret: str) -> None:
        """Only `secret` authenticates `client_id` (a wrong one: AADSTS7000215)."""
        self.front.register_secret(client_id, secret)

    def issuer_url(self, issuer: str = DEFAULT_ISSUER) -> str:
        return f"{self.base_url}/{issuer}"

    def token_endpoint(self, issuer: str = DEFAULT_ISSUER) -> str:
        return f"{self.issuer_url(issuer)}/token"

    def jwks_uri(self, issuer: str = DEFAULT_ISSUER) -> str:
        return f"{self.issuer_url(issuer)}/jwks"

    def request_token(
        self,
        *,
        client_id: str,
        client_secret: str,
        scope: str,
        issuer: str = DEFAULT_ISSUER,
        timeout: float = 10.0,
    ) -> requests.Response:
        """The operator's request on the wire, for tests that check the server itself."""
        return requests.post(
            self.token_endpoint(issuer),
            data={
                "client_id": client_id,
                "client_secret": client_secret,
                "grant_type": "client_credentials",
                "scope": scope,
            },
            timeout=timeout,
        )

    def start(self) -> None:
        if self._process is not None:
            raise TokenServerError("token server already started")
        java = shutil.which("java", path=self._java_path())
        if java is None:
            raise TokenServerError("`java` (17 or newer) is not on PATH or in $JAVA_HOME/bin")
        classpath = os.pathsep.join(str(jar) for jar in ensure_classpath(self.version))
        # A free port can be taken by someone else before the JVM binds it; try again then.
        last_error = ""
        for _attempt in range(3):
            self.upstream_port = _free_port()
            env = dict(os.environ)
            env.update(
                SERVER_HOSTNAME="127.0.0.1",
                SERVER_PORT=str(self.upstream_port),
                JSON_CONFIG=json.dumps(server_config(self.token_expiry)),
            )
            env.pop("JSON_CONFIG_PATH", None)
            process = ManagedProcess(
                "mock-oauth2-server",
                [java, *_JVM_OPTIONS, "-cp", classpath, MAIN_CLASS],
                env=env,
                log_dir=self.log_dir,
            )
            process.start()
            self._process = process
            ready, last_error = self._wait_ready(process)
            if ready:
                front = VerifyingFront(f"http://127.0.0.1:{self.upstream_port}")
                front.start()
                self._front = front
                self.port = front.port
                return
            process.stop()
            self._process = None
        raise TokenServerError(f"mock-oauth2-server did not come up: {last_error}")

    def _java_path(self) -> str | None:
        java_home = os.environ.get("JAVA_HOME")
        if java_home:
            return os.pathsep.join([str(Path(java_home) / "bin"), os.environ.get("PATH", "")])
        return None

    def _wait_ready(self, process: ManagedProcess) -> tuple[bool, str]:
        url = f"http://127.0.0.1:{self.upstream_port}/{DEFAULT_ISSUER}/.well-known/openid-configuration"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = process.exit_code()
            if code is not None:
                return False, f"exited with {code}:\n{process.output_tail()}"
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return True, ""
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False, f"no answer within {self.startup_timeout}s:\n{process.output_tail()}"

    def stop(self) -> None:
        if self._front is not None:
            self._front.stop()
            self._front = None
        if self._process is not None:
            self._process.stop()
            self._process = None
