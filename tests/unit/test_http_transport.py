"""The operator's API calls over aiohttp (`kube/http_transport.py` behind `KubeApi`).

Real servers on loopback: pytest_httpserver (plain and TLS) for what is sent and
how answers map to errors, a raw asyncio server for what HTTP servers do not do
on request (never answering, dropping the connection, holding an answer back).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from m2m_token_operator.kube.call_priority import look_started
from m2m_token_operator.kube.http_transport import HttpTransport
from m2m_token_operator.kube.kube_api import (
    SECRET_FIELD_MANAGER,
    Conflict,
    KubeApi,
    KubeError,
    NotFound,
)

SECRET_PATH = "/api/v1/namespaces/shop/secrets/orders-api"
SECRETS_PATH = "/api/v1/namespaces/shop/secrets"
# What an error body may echo: it must never reach an error message.
ECHOED_DATA = "c2VjcmV0LXRva2Vu"


def _configuration(host: str) -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    configuration.host = host.rstrip("/")
    return configuration


def _api(configuration: kubernetes.client.Configuration, **options: Any) -> KubeApi:
    return KubeApi(kubernetes.client.ApiClient(configuration), **options)


@contextlib.asynccontextmanager
async def _opened(kube: KubeApi) -> AsyncIterator[KubeApi]:
    try:
        yield kube
    finally:
        await kube.aclose()


# Error mapping


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(404, NotFound), (409, Conflict), (422, KubeError), (500, KubeError), (403, KubeError)],
)
async def test_an_error_answer_is_its_status_and_reason_only(
    httpserver: HTTPServer, status: int, error_type: type[KubeError]
) -> None:
    httpserver.expect_request(SECRETS_PATH, method="POST").respond_with_json(
        {"kind": "Status", "code": status, "message": f"data: {ECHOED_DATA}"}, status=status
    )
    async with _opened(_api(_configuration(httpserver.url_for("")))) as kube:
        with pytest.raises(KubeError) as caught:
            await kube.create_secret("shop", {"metadata": {"name": "orders-api"}})
    assert type(caught.value) is error_type
    assert caught.value.status == status
    assert caught.value.action == "create Secret shop/orders-api"
    reason = Response(status=status).status.split(" ", 1)[1]  # werkzeug's reason phrase
    assert str(caught.value) == f"create Secret shop/orders-api failed: HTTP {status} {reason}"
    assert ECHOED_DATA not in repr(caught.value.args)


async def test_a_read_of_a_missing_object_is_none(httpserver: HTTPServer) -> None:
    httpserver.expect_request(SECRET_PATH, method="GET").respond_with_json(
        {"kind": "Status", "code": 404}, status=404
    )
    async with _opened(_api(_configuration(httpserver.url_for("")))) as kube:
        assert await kube.read_secret("shop", "orders-api") is None


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_refused_connection_is_a_kube_error_without_status() -> None:
    kube = _api(_configuration(f"http://127.0.0.1:{_closed_port()}"))
    async with _opened(kube):
        with pytest.raises(KubeError) as caught:
            await kube.read_secret("shop", "orders-api")
    assert type(caught.value) is KubeError
    assert caught.value.status is None
    assert str(caught.value) == "read Secret shop/orders-api failed: HTTP None ClientConnectorError"


# A raw HTTP/1.1 server: answers as its handler says, or drops the connection (None).

Handler = Callable[[str, str], Awaitable[tuple[int, bytes] | None]]


@dataclass
class RawServer:
    handler: Handler
    requests: list[tuple[str, str]] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                self.requests.append((method, target))
                answer = await self.handler(method, target)
                if answer is None:
                    return  # dropped: no answer
                status, body = answer
                writer.write(
                    f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def _raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    raw = RawServer(handler)
    server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


async def test_an_answer_that_never_comes_is_a_read_timeout() -> None:
    never = asyncio.Event()

    async def hang(method: str, target: str) -> None:
        await never.wait()

    async with _raw_server(hang) as server:
        kube = _api(_configuration(f"http://127.0.0.1:{server.port}"), request_timeout=(5.0, 0.2))
        async with _opened(kube):
            with pytest.raises(KubeError) as caught:
                await kube.read_secret("shop", "orders-api")
        never.set()
    assert caught.value.status is None
    assert str(caught.value).endswith("HTTP None SocketTimeoutError")
    assert server.requests == [("GET", SECRET_PATH)]  # a read that timed out is not sent again


async def test_a_dropped_connection_is_retried_once_for_a_get_and_never_for_a_post() -> None:
    async def drop(method: str, target: str) -> None:
        return None

    async with _raw_server(drop) as server:
        kube = _api(_configuration(f"http://127.0.0.1:{server.port}"))
        async with _opened(kube):
            with pytest.raises(KubeError) as read:
                await kube.read_secret("shop", "orders-api")
            reads = list(server.requests)
            server.requests.clear()
            with pytest.raises(KubeError) as created:
                await kube.create_secret("shop", {"metadata": {"name": "orders-api"}})
    assert reads == [("GET", SECRET_PATH)] * 2
    assert server.requests == [("POST", f"{SECRETS_PATH}?fieldManager={SECRET_FIELD_MANAGER}")]
    assert read.value.status is None
    assert created.value.status is None
    assert str(created.value).endswith("HTTP None ServerDisconnectedError")


async def test_calls_share_one_keep_alive_connection() -> None:
    async def found(method: str, target: str) -> tuple[int, bytes]:
        return 200, b'{"metadata": {"name": "orders-api"}}'

    async with _raw_server(found) as server:
        kube = _api(_configuration(f"http://127.0.0.1:{server.port}"))
        async with _opened(kube):
            for _ in range(5):
                assert await kube.read_secret("shop", "orders-api") is not None
    assert len(server.requests) == 5
    assert server.connections == 1


async def test_calls_go_through_the_configured_proxy() -> None:
    async def found(method: str, target: str) -> tuple[int, bytes]:
        return 200, b"{}"

    async with _raw_server(found) as proxy:
        configuration = _configuration("http://kube-api.invalid:6443")  # never resolved here
        configuration.proxy = f"http://127.0.0.1:{proxy.port}"
        async with _opened(_api(configuration)) as kube:
            assert await kube.read_secret("shop", "orders-api") == {}
    assert proxy.requests == [("GET", f"http://kube-api.invalid:6443{SECRET_PATH}")]


async def test_waiting_calls_are_sent_oldest_look_first() -> None:
    """One slot: while the first request is held, the others wait in look order."""
    held = asyncio.Event()
    release = asyncio.Event()

    async def answer(method: str, target: str) -> tuple[int, bytes]:
        if target.endswith("/first"):
            held.set()
            await release.wait()
        return 200, b"{}"

    async with _raw_server(answer) as server:
        kube = _api(_configuration(f"http://127.0.0.1:{server.port}"), max_workers=1)
        async with _opened(kube):

            async def read(name: str, look: float) -> None:
                with look_started(look):
                    await kube.read_secret("shop", name)

            first = asyncio.create_task(read("first", 0.0))
            await held.wait()
            waiting = [
                asyncio.create_task(read(name, look))
                for name, look in [("young", 30.0), ("old", 10.0), ("middle", 20.0)]
            ]
            await asyncio.sleep(0)  # each runs up to the gate
            assert kube._admission.waiting == 3
            release.set()
            await asyncio.gather(first, *waiting)
    assert [target.rsplit("/", 1)[1] for _, target in server.requests] == [
        "first",
        "old",
        "middle",
        "young",
    ]


# What is sent


async def test_a_secret_write_sends_compact_json_a_bearer_token_and_its_field_manager(
    httpserver: HTTPServer,
) -> None:
    sent: list[Request] = []

    def record(request: Request) -> Response:
        sent.append(request)
        return Response(request.get_data(), content_type="application/json")

    httpserver.expect_request(SECRETS_PATH, method="POST").respond_with_handler(record)
    httpserver.expect_request(SECRET_PATH, method="PUT").respond_with_handler(record)
    httpserver.expect_request(SECRET_PATH, method="DELETE").respond_with_handler(record)
    configuration = _configuration(httpserver.url_for(""))
    configuration.api_key = {"authorization": "t0"}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    body = {"metadata": {"name": "orders-api"}, "data": {"token": ECHOED_DATA}}
    async with _opened(_api(configuration)) as kube:
        assert await kube.create_secret("shop", body) == body
        assert await kube.replace_secret("shop", body) == body
        await kube.delete_secret("shop", "orders-api", uid="u1")
        assert kube.writes == 3
    assert [(r.method, r.path, r.args.to_dict()) for r in sent] == [
        ("POST", SECRETS_PATH, {"fieldManager": SECRET_FIELD_MANAGER}),
        ("PUT", SECRET_PATH, {"fieldManager": SECRET_FIELD_MANAGER}),
        ("DELETE", SECRET_PATH, {}),
    ]
    assert {r.headers["Content-Type"] for r in sent} == {"application/json"}
    assert {r.headers["Authorization"] for r in sent} == {"Bearer t0"}
    assert {r.headers["Accept"] for r in sent} == {"application/json"}
    # Uncompressed answers: identity is the only encoding offered.
    assert {r.headers["Accept-Encoding"] for r in sent} == {"identity"}
    assert sent[0].get_data() == json.dumps(body, separators=(",", ":")).encode()
    assert json.loads(sent[2].get_data()) == {"preconditions": {"uid": "u1"}}


async def test_a_list_sends_its_label_selector(httpserver: HTTPServer) -> None:
    selector = "m2m.dev/owner-uid=u1,app in (a,b)"
    httpserver.expect_request(
        SECRETS_PATH, method="GET", query_string={"labelSelector": selector}
    ).respond_with_json({"items": [{"metadata": {"name": "orders-api"}}]})
    async with _opened(_api(_configuration(httpserver.url_for("")))) as kube:
        items = await kube.list_secrets("shop", label_selector=selector)
    assert items == [{"metadata": {"name": "orders-api"}}]


def _rotating(configuration: kubernetes.client.Configuration) -> list[str]:
    """A refresh hook that hands out t1, t2, ... and records each call."""
    calls: list[str] = []

    def refresh(config: kubernetes.client.Configuration) -> None:
        # Where the in-cluster config's hook puts the token it read from its file.
        calls.append(f"t{len(calls) + 1}")
        config.api_key["BearerToken"] = f"Bearer {calls[-1]}"

    configuration.api_key["BearerToken"] = "Bearer t0"  # as loaded, before any refresh
    configuration.refresh_api_key_hook = refresh  # type: ignore[assignment]
    return calls


async def test_a_refreshed_token_is_sent_once_the_headers_are_older_than_allowed(
    httpserver: HTTPServer,
) -> None:
    """The in-cluster config refreshes the ServiceAccount token through this hook; the
    transport asks it again every `auth_seconds` (here: a clock the test moves)."""
    seen: list[str] = []

    def record(request: Request) -> Response:
        seen.append(request.headers["Authorization"])
        return Response("{}", content_type="application/json")

    httpserver.expect_request(SECRET_PATH).respond_with_handler(record)
    configuration = _configuration(httpserver.url_for(""))
    calls = _rotating(configuration)
    now = [0.0]
    transport = HttpTransport(
        configuration, connections=1, timeout=(5.0, 5.0), auth_seconds=5.0, monotonic=lambda: now[0]
    )
    try:
        for moment in (0.0, 4.9, 5.0, 12.0):
            now[0] = moment
            await transport.request("GET", SECRET_PATH)
    finally:
        await transport.aclose()
    assert seen == ["Bearer t1", "Bearer t1", "Bearer t2", "Bearer t3"]
    assert calls == ["t1", "t2", "t3"]


async def test_a_401_makes_the_next_request_ask_for_the_token_again(
    httpserver: HTTPServer,
) -> None:
    seen: list[str] = []

    def record(request: Request) -> Response:
        seen.append(request.headers["Authorization"])
        status = 401 if len(seen) == 1 else 200
        return Response("{}", status=status, content_type="application/json")

    httpserver.expect_request(SECRET_PATH).respond_with_handler(record)
    configuration = _configuration(httpserver.url_for(""))
    _rotating(configuration)
    transport = HttpTransport(configuration, connections=1, timeout=(5.0, 5.0), auth_seconds=3600.0)
    try:
        refused = await transport.request("GET", SECRET_PATH)
        accepted = await transport.request("GET", SECRET_PATH)
    finally:
        await transport.aclose()
    assert (refused.status, accepted.status) == (401, 200)
    assert seen == ["Bearer t1", "Bearer t2"]


async def test_the_token_of_a_kubeconfig_is_sent(httpserver: HTTPServer, tmp_path: Path) -> None:
    """Configured as the operator's is outside a cluster: by `load_kube_config`."""
    httpserver.expect_request(
        SECRET_PATH, headers={"Authorization": "Bearer kubeconfig-token"}
    ).respond_with_json({"metadata": {"name": "orders-api"}})
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": httpserver.url_for("")}}],
                "users": [{"name": "u", "user": {"token": "kubeconfig-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), client_configuration=configuration
    )
    async with _opened(_api(configuration)) as kube:
        assert await kube.read_secret("shop", "orders-api") == {"metadata": {"name": "orders-api"}}


# TLS: the server's certificate checked against a CA file, and a client certificate


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key_and_cert(
    directory: Path,
    name: str,
    *,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name] | None = None,
    server: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Name, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, signer_name = issuer if issuer is not None else (key, subject)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), False
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False,
            )
    cert = builder.sign(signer_key, hashes.SHA256())
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, subject, cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_name, ca, _ = _key_and_cert(directory, "ca")
    _, _, server_cert, server_key = _key_and_cert(
        directory, "server", issuer=(ca_key, ca_name), server=True
    )
    _, _, client_cert, client_key = _key_and_cert(directory, "client", issuer=(ca_key, ca_name))
    _, _, other_ca, _ = _key_and_cert(directory, "other-ca")
    return Pki(ca, server_cert, server_key, client_cert, client_key, other_ca)


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[HTTPServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED  # the API server asks for the client certificate
    context.load_verify_locations(pki.ca)
    server = HTTPServer(host="127.0.0.1", ssl_context=context)
    server.start()
    try:
        yield server
    finally:
        server.clear()
        server.stop()


def _tls_configuration(
    server: HTTPServer, ca: Path, client: tuple[Path, Path] | None
) -> kubernetes.client.Configuration:
    configuration = _configuration(server.url_for(""))
    assert configuration.host.startswith("https://127.0.0.1:")
    configuration.ssl_ca_cert = str(ca)
    if client is not None:
        configuration.cert_file, configuration.key_file = (str(path) for path in client)
    return configuration


async def test_tls_with_a_ca_file_and_a_client_certificate(
    tls_server: HTTPServer, pki: Pki
) -> None:
    tls_server.expect_request(SECRET_PATH).respond_with_json({"metadata": {"name": "orders-api"}})
    configuration = _tls_configuration(tls_server, pki.ca, (pki.client_cert, pki.client_key))
    async with _opened(_api(configuration)) as kube:
        assert await kube.read_secret("shop", "orders-api") == {"metadata": {"name": "orders-api"}}
    tls_server.check_assertions()


@pytest.mark.parametrize(
    ("trusted", "with_client_cert"),
    [("other", True), ("ca", False)],
    ids=["server-certificate-from-another-ca", "no-client-certificate"],
)
async def test_tls_refused_either_way_is_a_kube_error_without_status(
    tls_server: HTTPServer, pki: Pki, trusted: str, with_client_cert: bool
) -> None:
    tls_server.expect_request(SECRET_PATH).respond_with_json({})
    configuration = _tls_configuration(
        tls_server,
        pki.ca if trusted == "ca" else pki.other_ca,
        (pki.client_cert, pki.client_key) if with_client_cert else None,
    )
    async with _opened(_api(configuration)) as kube:
        with pytest.raises(KubeError) as caught:
            await kube.read_secret("shop", "orders-api")
    assert caught.value.status is None
    assert not tls_server.log  # the request never reached the handler


# Closing


async def test_aclose_releases_the_session_and_refuses_later_calls(
    httpserver: HTTPServer,
) -> None:
    httpserver.expect_request(SECRET_PATH).respond_with_json({})
    kube = _api(_configuration(httpserver.url_for("")))
    await kube.read_secret("shop", "orders-api")
    session = kube._http._session
    assert session is not None
    await kube.aclose()
    assert session.closed
    assert kube.closed
    with pytest.raises(KubeError) as caught:
        await kube.read_secret("shop", "orders-api")
    assert str(caught.value).endswith("HTTP None TransportClosed")


async def test_close_from_synchronous_code_closes_the_session_on_its_loop(
    httpserver: HTTPServer,
) -> None:
    httpserver.expect_request(SECRET_PATH).respond_with_json({})
    kube = _api(_configuration(httpserver.url_for("")))
    await kube.read_secret("shop", "orders-api")
    session = kube._http._session
    assert session is not None
    kube.close()  # as Runtime called closers before: no await
    assert kube.closed
    await asyncio.gather(*kube._http._closing)
    assert session.closed
