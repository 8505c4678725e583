"""engine.mi.client over https:// against the engine's own HTTP MI with a web
config (real loopback sockets): a CA file, basic auth, mutual TLS, a 401 that
names no password, and a handshake that a server stalls failing at the call's
deadline with reason "timeout" (the CLI and [[upstream]]: tests/system/test_cli_auth.py)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.errors import MIClientError
from engine.mi.client import call
from engine.mi.http_client import ClientAuth
from engine.mi.server import HTTPServer
from engine.mi.webconfig import WebConfig
from engine.producer import Engine
from tests.helpers.mi import ONE_WORKER
from tests.helpers.tls import PASSWORD, USER, TLSFiles, web_config

ENGINE = {"events": ["E_SAMPLE"], **ONE_WORKER}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def serve(engine: Engine) -> Iterator[Callable[..., str]]:
    servers: list[HTTPServer] = []

    def start(path: Path) -> str:
        server = HTTPServer(engine, ("127.0.0.1", 0), web=WebConfig(str(path)), timeout=5.0)
        servers.append(server)
        server.start()
        host, port = server.address
        return f"https://{host}:{port}/mi"

    yield start
    for server in servers:
        server.stop()


def _names(result: Any) -> list[str]:
    return [e["name"] for e in result["Events"]]


def test_ca_file_and_basic_auth(tls: TLSFiles, serve: Callable[..., str], tmp_path: Path) -> None:
    url = serve(web_config(tls.cert.parent / "client-web.yml", tls))
    good = ClientAuth(ca_file=str(tls.ca.path), user=USER, password=PASSWORD)
    assert _names(call(url, "events_list", auth=good)) == ["E_SAMPLE"]
    # the password from a file (read at each call)
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    from_file = ClientAuth(ca_file=str(tls.ca.path), user=USER, password_file=str(secret))
    assert _names(call(url, "events_list", auth=from_file)) == ["E_SAMPLE"]
    secret.write_text("rotated\n")
    with pytest.raises(MIClientError, match="authentication failed"):
        call(url, "events_list", auth=from_file)
    # the URL's user, with the password given apart
    with_user = url.replace("https://", f"https://{USER}@")
    only_password = ClientAuth(ca_file=str(tls.ca.path), password=PASSWORD)
    assert _names(call(with_user, "events_list", auth=only_password)) == ["E_SAMPLE"]
    # a wrong password and none at all: a 401, said plainly, the password not in it
    for auth in (
        ClientAuth(ca_file=str(tls.ca.path), user=USER, password="wrong-" + PASSWORD),
        ClientAuth(ca_file=str(tls.ca.path)),
    ):
        with pytest.raises(MIClientError) as info:
            call(url, "events_list", auth=auth)
        assert "authentication failed (HTTP 401)" in str(info.value)
        assert PASSWORD not in str(info.value) and info.value.reason == "unreachable"
    # the system's CAs do not vouch for the test CA
    with pytest.raises(MIClientError, match="certificate is not trusted"):
        call(url, "events_list", auth=ClientAuth(user=USER, password=PASSWORD))
    with pytest.raises(MIClientError, match="cannot load the CA file"):
        call(url, "events_list", auth=ClientAuth(ca_file=str(tmp_path / "none.pem")))


def test_mutual_tls(tls: TLSFiles, serve: Callable[..., str], tmp_path: Path) -> None:
    path = web_config(
        tls.cert.parent / "client-mtls.yml",
        tls,
        users=False,
        client_auth="RequireAndVerifyClientCert",
    )
    url = serve(path)
    with_cert = ClientAuth(
        ca_file=str(tls.ca.path), cert_file=str(tls.client_cert), key_file=str(tls.client_key)
    )
    assert _names(call(url, "events_list", auth=with_cert)) == ["E_SAMPLE"]
    with pytest.raises(MIClientError) as info:  # no client certificate: refused
        call(url, "events_list", auth=ClientAuth(ca_file=str(tls.ca.path)))
    assert info.value.reason in ("unreachable", "bad_reply")
    with pytest.raises(MIClientError, match="cannot load the client certificate"):
        call(url, "events_list", auth=ClientAuth(cert_file=str(tmp_path / "none.crt")))


def test_a_stalled_handshake_fails_at_the_deadline() -> None:
    # A listener that accepts (the kernel does) and never speaks TLS.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        with pytest.raises(MIClientError) as info:
            call(f"https://127.0.0.1:{port}/mi", "events_list", timeout=0.5)
        assert info.value.reason == "timeout"
        assert "TLS handshake not done by the deadline" in str(info.value)
