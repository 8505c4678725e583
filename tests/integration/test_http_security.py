"""The HTTP listeners closed (SPEC section 11): TLS, basic auth, the browser checks,
/health and /ready, a metrics-only listener, over real loopback sockets with real
clients (http.client, urllib as opensips-cli and python-opensips use it)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.mi.health import not_ready
from engine.mi.http import RequestPolicy, SecurityCounters
from engine.mi.server import HTTPServer
from engine.mi.webconfig import WebConfig
from engine.producer import Engine
from tests.helpers.mi import EVENTS_REQUEST, ONE_WORKER
from tests.helpers.support import eventually
from tests.helpers.tls import PASSWORD, USER, TLSFiles, web_config

ENGINE = {"events": ["E_SAMPLE"], **ONE_WORKER}
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
JSON = {"Content-Type": "application/json"}
RAISE = b'{"jsonrpc":"2.0","id":1,"method":"raise_event","params":["E_SAMPLE"]}'


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def serve(engine: Engine) -> Iterator[Callable[..., HTTPServer]]:
    servers: list[HTTPServer] = []

    def start(**kwargs: Any) -> HTTPServer:
        kwargs.setdefault("timeout", 1.0)
        server = HTTPServer(engine, ("127.0.0.1", 0), **kwargs)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def client_context(tls: TLSFiles, *, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca.path))
    if client_cert:
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    return context


def request(
    server: HTTPServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_tls_and_basic_auth(serve: Callable[..., HTTPServer], tls: TLSFiles) -> None:
    web = WebConfig(str(web_config(tls.cert.parent / "web.yml", tls)))
    server = serve(web=web)
    assert server.url.startswith("https://")
    context = client_context(tls)
    status, _, body = request(server, "POST", "/mi", EVENTS_REQUEST, {**JSON, **AUTH}, context)
    assert status == 200 and b'"E_SAMPLE"' in body
    status, headers, _ = request(server, "POST", "/mi", EVENTS_REQUEST, JSON, context)
    assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="')
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()}
    assert request(server, "GET", "/metrics", None, wrong, context)[0] == 401
    status, _, metrics = request(server, "GET", "/metrics", None, AUTH, context)
    assert status == 200
    text = metrics.decode()
    assert 'event_datagram_http_auth_failures_total{listener="mi",reason="missing"} 1.0' in text
    assert (
        'event_datagram_http_auth_failures_total{listener="mi",reason="bad_credentials"} 1.0'
        in text
    )
    # Plain HTTP to a TLS listener is not served, and counted as a failed handshake.
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        request(server, "GET", "/health", None, AUTH)
    assert server.security.snapshot()[2].get(("mi", "error"), 0) >= 1


def test_keep_alive_reuses_the_verified_credential(
    serve: Callable[..., HTTPServer], tls: TLSFiles
) -> None:
    web = WebConfig(str(web_config(tls.cert.parent / "keep.yml", tls)))
    server = serve(web=web)
    conn = http.client.HTTPSConnection(*server.address, timeout=10, context=client_context(tls))
    try:
        for _ in range(20):
            conn.request("POST", "/mi", EVENTS_REQUEST, {**JSON, **AUTH})
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("Connection") != "close"
            response.read()
    finally:
        conn.close()


def test_client_certificates(serve: Callable[..., HTTPServer], tls: TLSFiles) -> None:
    path = web_config(
        tls.cert.parent / "mtls.yml", tls, users=False, client_auth="RequireAndVerifyClientCert"
    )
    server = serve(web=WebConfig(str(path)))
    with_cert = client_context(tls, client_cert=True)
    assert request(server, "GET", "/health", context=with_cert)[:3:2] == (200, b"OK\n")
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        request(server, "GET", "/health", context=client_context(tls))
    eventually(
        lambda: server.security.snapshot()[2].get(("mi", "error"), 0) >= 1,
        what="the refused handshake counted",
    )


def test_opensips_cli_and_python_opensips_requests(
    serve: Callable[..., HTTPServer], tls: TLSFiles
) -> None:
    """Both send, with urllib: Content-Type application/json, and for https an
    unverified context (opensipscli/communication/http.py, opensips/mi/http.py)."""
    plain = serve()
    tls_only = serve(web=WebConfig(str(web_config(tls.cert.parent / "t.yml", tls, users=False))))
    for server, context in ((plain, None), (tls_only, ssl._create_unverified_context())):
        req = urllib.request.Request(
            server.url, EVENTS_REQUEST, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, context=context, timeout=10) as reply:
            assert json.loads(reply.read())["result"]["Events"][0]["name"] == "E_SAMPLE"


def test_browser_requests_are_refused(serve: Callable[..., HTTPServer]) -> None:
    server = serve(policy=RequestPolicy.make(True, ["https://ops.example"], ["mi.internal"]))
    port = server.address[1]
    # The CSRF repro: a cross-origin text/plain POST (no preflight) that subscribes.
    csrf = (
        b'{"jsonrpc":"2.0","id":1,"method":"event_subscribe",'
        b'"params":["E_SAMPLE","udp:127.0.0.1:9"]}'
    )
    status, _, _ = request(
        server, "POST", "/mi", csrf, {"Content-Type": "text/plain;charset=UTF-8"}
    )
    assert status == 415
    origin = {**JSON, "Origin": "https://evil.example"}
    assert request(server, "POST", "/mi", csrf, origin)[0] == 403
    rebound = {**JSON, "Host": f"evil.example:{port}"}
    assert request(server, "POST", "/mi", csrf, rebound)[0] == 421
    assert request(server, "GET", "/metrics", None, {"Host": "evil.example"})[0] == 421
    # What is allowed still works, and nothing above subscribed anyone.
    ok = {**JSON, "Origin": "https://ops.example", "Host": f"mi.internal:{port}"}
    status, _, body = request(server, "POST", "/mi", EVENTS_REQUEST, ok)
    assert status == 200
    status, _, body = request(
        server, "POST", "/mi", b'{"jsonrpc":"2.0","id":2,"method":"subscribers_list"}', JSON
    )
    assert b"udp:127.0.0.1:9" not in body
    refused = server.security.snapshot()[1]
    assert refused == {("mi", "content_type"): 1, ("mi", "origin"): 1, ("mi", "host"): 2}


def test_a_stalled_handshake_costs_a_buffer_and_is_closed_at_the_deadline(
    serve: Callable[..., HTTPServer], tls: TLSFiles
) -> None:
    web = WebConfig(str(web_config(tls.cert.parent / "stall.yml", tls, users=False)))
    server = serve(web=web, timeout=1.0)
    stalled = [socket.create_connection(server.address, timeout=30) for _ in range(3)]
    try:
        stalled[0].sendall(b"\x16\x03\x01\x00\xff")  # the start of a ClientHello, no more
        context = client_context(tls)
        for _ in range(5):  # served meanwhile, by the one loop thread
            assert request(server, "GET", "/health", context=context)[0] == 200
        for sock in stalled:  # closed by the server at the head deadline: EOF
            assert sock.recv(1024) == b""
    finally:
        for sock in stalled:
            sock.close()
    assert server.security.snapshot()[2].get(("mi", "timeout"), 0) == 3


def test_a_changed_certificate_is_served(serve: Callable[..., HTTPServer], tmp_path: Path) -> None:
    files = TLSFiles.make(tmp_path)
    server = serve(web=WebConfig(str(web_config(tmp_path / "web.yml", files, users=False))))
    context = client_context(files)

    def serial() -> int:
        with (
            socket.create_connection(server.address, timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            der = sock.getpeercert(binary_form=True)
        from cryptography import x509

        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    assert serial() == files.serial
    new = files.ca.issue(files.cert, files.key, "event-datagram renewed")
    eventually(lambda: serial() == new, timeout=20, what="the renewed certificate served")
    # A broken key file: the running certificate stays.
    files.key.write_text("not a key\n")
    assert not server.web.reload()  # type: ignore[union-attr]
    assert serial() == new


def test_health_ready_and_a_metrics_only_listener(serve: Callable[..., HTTPServer]) -> None:
    reasons: list[str] = []
    security = SecurityCounters()
    mi = serve(ready=lambda: list(reasons), serve_metrics=False, security=security)
    metrics = serve(ready=lambda: list(reasons), serve_mi=False, security=security, name="metrics")
    assert request(mi, "GET", "/metrics")[0] == 404
    assert request(metrics, "POST", "/mi", EVENTS_REQUEST, JSON)[0] == 404
    assert request(mi, "POST", "/mi", EVENTS_REQUEST, JSON)[0] == 200
    for server in (mi, metrics):
        assert request(server, "GET", "/health")[::2] == (200, b"OK\n")
        assert request(server, "GET", "/ready")[::2] == (200, b"ready\n")
    reasons.append("worker 0 is down")
    status, _, body = request(metrics, "GET", "/ready")
    assert status == 503 and b"worker 0 is down" in body
    request(metrics, "GET", "/metrics", None, {"Origin": "https://x.example"})
    status, _, text = request(metrics, "GET", "/metrics")
    assert status == 200
    assert (
        b'event_datagram_http_requests_refused_total{listener="metrics",reason="origin"} 1.0'
        in text
    )
    assert b'event_datagram_http_requests_refused_total{listener="mi",reason="origin"} 0.0' in text


def test_ready_follows_a_killed_worker(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(["E_SAMPLE"], **ONE_WORKER)
    server = HTTPServer(engine, ("127.0.0.1", 0), ready=lambda: not_ready(engine))
    server.start()
    conn = http.client.HTTPConnection(*server.address, timeout=10)

    def ready() -> tuple[int, bytes]:
        conn.request("GET", "/ready")
        response = conn.getresponse()
        return response.status, response.read()

    try:
        eventually(lambda: ready()[0] == 200, what="ready at start")
        pid = engine.statistics().workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        seen = []
        for _ in range(100_000):  # until the restarted worker is ready again
            status, body = ready()
            seen.append(status)
            if status == 503:
                assert b"worker 0 is" in body
            elif seen.count(503):
                break
        assert 503 in seen and seen[-1] == 200, seen[-5:]
        assert engine.statistics().workers[0].restarts == 1
    finally:
        conn.close()
        server.stop()
    engine.stop()
    assert not_ready(engine) == ["the engine is not running"]
