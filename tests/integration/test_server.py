"""engine/server.py: the HTTP and UDP datagram MI listeners, in this process,
over real loopback sockets, with their limits made small enough to test."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from engine.mi.datagram import DatagramServer
from engine.mi.dispatch import handle
from engine.mi.server import HTTPServer
from engine.producer import Engine
from tests.helpers.mi import EVENTS_REPLY, ONE_WORKER
from tests.helpers.mi import EVENTS_REQUEST as REQUEST
from tests.helpers.support import eventually

# The module's shared `engine` (conftest.py): the transport tests' probe, EVENTS_REPLY.
ENGINE = {"events": ["E_SAMPLE", "E_BENCH"], **ONE_WORKER}


@pytest.fixture
def http_server(engine: Engine) -> Iterator[HTTPServer]:
    server = HTTPServer(
        engine,
        ("127.0.0.1", 0),
        max_body=4096,
        timeout=0.5,
        request_deadline=1.0,
        max_connections=4,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def post(server: HTTPServer, body: bytes, path: str = "/mi") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def raw_http(server: HTTPServer, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(server.address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_http_post_mi(engine: Engine, http_server: HTTPServer) -> None:
    status, content_type, body = post(http_server, REQUEST)
    assert (status, content_type, body) == (200, "application/json", EVENTS_REPLY)
    assert body == handle(engine, REQUEST)
    # A notification: done, nothing to say.
    status, _, body = post(http_server, b'{"jsonrpc":"2.0","method":"events_list"}')
    assert (status, body) == (204, b"")
    status, _, body = post(http_server, b'{"jsonrpc":"2.0",')
    assert status == 200
    assert body == b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'


def test_http_keep_alive(http_server: HTTPServer) -> None:
    conn = http.client.HTTPConnection(*http_server.address, timeout=5)
    try:
        for _ in range(5):
            conn.request("POST", "/mi", REQUEST)
            response = conn.getresponse()
            assert response.read() == EVENTS_REPLY
    finally:
        conn.close()


def test_http_limits_and_errors(http_server: HTTPServer) -> None:
    status, content_type, body = post(http_server, b" " * 4097)
    assert (status, content_type) == (413, "application/json")
    assert json.loads(body)["error"] == {
        "code": -32600,
        "message": "Invalid Request",
        "data": "request body is 4097 bytes, over the 4096-byte limit",
    }
    assert post(http_server, b" " * 4000 + REQUEST[:96])[0] == 200  # within the limit
    no_length = raw_http(http_server, b"POST /mi HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert no_length.startswith(b"HTTP/1.1 411 ") and b"Content-Length is required" in no_length
    chunked = raw_http(
        http_server,
        b"POST /mi HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 501 ")
    bad_length = raw_http(http_server, b"POST /mi HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
    assert bad_length.startswith(b"HTTP/1.1 400 ")
    huge_length = raw_http(http_server, b"POST /mi HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n")
    assert huge_length.startswith(b"HTTP/1.1 413 ")
    two_lengths = raw_http(
        http_server,
        b"POST /mi HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 96\r\n\r\n" + REQUEST[:96],
    )
    assert two_lengths.startswith(b"HTTP/1.1 400 ") and b"conflicting Content-Length" in two_lengths
    same_twice = b"Content-Length: %d\r\n" % len(REQUEST)
    again = raw_http(http_server, b"POST /mi HTTP/1.1\r\n" + same_twice * 2 + b"\r\n" + REQUEST)
    assert again.startswith(b"HTTP/1.1 200 ")  # the same value twice frames one body
    assert post(http_server, REQUEST, "/other")[0] == 404
    assert raw_http(http_server, b"GET /mi HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw_http(http_server, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert b"400" in raw_http(http_server, b"garbage\r\n\r\n")  # taken for HTTP/0.9
    assert raw_http(http_server, b"PUT /mi HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 501 ")
    assert post(http_server, REQUEST)[2] == EVENTS_REPLY  # still serving


def test_http_idle_and_slow_clients_are_cut_off(http_server: HTTPServer) -> None:
    idle = socket.create_connection(http_server.address)
    slow = socket.create_connection(http_server.address)
    try:
        idle.settimeout(5)
        slow.settimeout(0.2)
        start = time.monotonic()
        # The slow client trickles a request head; it is cut off at its deadline (0.5 s).
        request = b"POST /mi HTTP/1.1\r\nContent-Length: 100\r\nX-Pad: " + b"a" * 200
        cut = False
        for byte in request:
            try:
                slow.send(bytes([byte]))
                time.sleep(0.02)
                if slow.recv(100) == b"":
                    cut = True
                    break
            except TimeoutError:
                continue
            except OSError:
                cut = True
                break
        assert cut and time.monotonic() - start < 4.0
        assert idle.recv(100) == b""  # the idle one was closed after its 0.5 s timeout
        assert post(http_server, REQUEST)[2] == EVENTS_REPLY  # others are served meanwhile
    finally:
        idle.close()
        slow.close()


def test_http_connection_limit(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(engine, ("127.0.0.1", 0), timeout=30, max_connections=4)
    server.start()
    try:
        # Full of connections waiting on their clients: the one waiting longest makes room.
        held = []
        for _ in range(4):
            held.append(socket.create_connection(server.address, timeout=5))
            time.sleep(0.05)
        eventually(lambda: server.counters()["open"] == 4, what="4 connections open")
        assert post(server, REQUEST)[2] == EVENTS_REPLY
        assert held[0].recv(100) == b""  # evicted, the oldest
        for sock in held[1:]:
            sock.settimeout(0.1)
            with pytest.raises(TimeoutError):
                sock.recv(100)
        assert server.counters()["evicted"] == 1
        for sock in held:
            sock.close()
        eventually(lambda: server.counters()["open"] == 0, what="the held ones closed")

        # Full of requests being answered (the MI handler blocks): a 503, then all served.
        release, entered = threading.Event(), []

        def blocked(engine: Engine, body: bytes) -> bytes | None:
            entered.append(body)
            release.wait(10)
            return handle(engine, body)

        monkeypatch.setattr("engine.mi.server.handle", blocked)
        framed = b"POST /mi HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(REQUEST) + REQUEST
        busy = [socket.create_connection(server.address, timeout=5) for _ in range(4)]
        try:
            for sock in busy:
                sock.sendall(framed)
            eventually(lambda: len(entered) == 4, what="4 requests with the workers")
            refused = raw_http(server, framed)
            assert refused.startswith(b"HTTP/1.1 503 ") and server.counters()["refused"] == 1
            release.set()
            for sock in busy:
                reply = sock.recv(65536)
                assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(EVENTS_REPLY)
        finally:
            release.set()
            for sock in busy:
                sock.close()
        assert post(server, REQUEST)[2] == EVENTS_REPLY
    finally:
        server.stop()


def test_http_pipelining_http10_and_expect(http_server: HTTPServer) -> None:
    framed = b"POST /mi HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(REQUEST) + REQUEST
    closing = framed.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n")
    # Two requests in one write: two replies, in order; the second closes the connection.
    replies = raw_http(http_server, framed + closing)
    assert replies.count(b"HTTP/1.1 200 ") == 2 and replies.count(EVENTS_REPLY) == 2
    assert replies.endswith(EVENTS_REPLY) and replies.count(b"Connection: close") == 1
    # HTTP/1.0 closes after its reply unless it asks for keep-alive.
    http10 = framed.replace(b"HTTP/1.1", b"HTTP/1.0")
    reply = raw_http(http_server, http10)
    assert reply.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in reply
    with socket.create_connection(http_server.address, timeout=5) as sock:
        keep = http10.replace(b"HTTP/1.0\r\n", b"HTTP/1.0\r\nConnection: keep-alive\r\n")
        for _ in range(2):
            sock.sendall(keep)
            reply = sock.recv(65536)
            assert reply.endswith(EVENTS_REPLY) and b"Connection: close" not in reply
    # Expect: 100-continue gets its interim reply before the body is sent.
    with socket.create_connection(http_server.address, timeout=5) as sock:
        head, _, body = framed.partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(65536).endswith(EVENTS_REPLY)
    # HEAD /metrics: the headers of the page, without the page.
    reply = raw_http(http_server, b"HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\n")


def test_metrics_endpoint(http_server: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = http.client.HTTPConnection(*http_server.address, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200 and b"event_datagram_" in body
        # Without the metrics module, a clear 503 (and the MI keeps working).
        monkeypatch.setitem(sys.modules, "engine.metrics", None)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 503 and b"engine.metrics" in response.read()
    finally:
        conn.close()
    assert post(http_server, REQUEST)[2] == EVENTS_REPLY


@pytest.fixture
def datagram_server(engine: Engine) -> Iterator[DatagramServer]:
    server = DatagramServer(engine, ("127.0.0.1", 0))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def udp_call(server: DatagramServer, data: bytes, timeout: float = 5.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, server.address)
        try:
            return sock.recv(70000)
        except TimeoutError:
            return None


def test_datagram_replies_to_the_sender(datagram_server: DatagramServer) -> None:
    assert datagram_server.url == f"udp:127.0.0.1:{datagram_server.address[1]}"
    assert udp_call(datagram_server, REQUEST) == EVENTS_REPLY
    assert udp_call(datagram_server, b'{"jsonrpc":"2.0","method":"events_list"}', 0.3) is None
    assert udp_call(datagram_server, b"\xff" * 60000) == (
        b'{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error","data":"invalid UTF-8"},'
        b'"id":null}'
    )
    server6 = DatagramServer(datagram_server._engine, ("::1", 0))
    server6.start()
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(REQUEST, server6.address)
            assert sock.recv(70000) == EVENTS_REPLY
    finally:
        server6.stop()


def test_datagram_reply_too_big_for_one_datagram(engine: Engine) -> None:
    server = DatagramServer(engine, ("127.0.0.1", 0))
    server.start()
    try:
        for port in range(1, 1500):
            engine.subscribe("E_BENCH", f"udp:127.0.0.1:{port}", 600)
        request = b'{"jsonrpc":"2.0","id":9,"method":"subscribers_list","params":["E_BENCH"]}'
        assert len(handle(engine, request) or b"") > 65507
        reply = udp_call(server, request)
        assert reply is not None
        error = json.loads(reply)
        assert error["id"] == 9 and error["error"]["code"] == -32000
        assert "too big for one datagram" in error["error"]["data"]
    finally:
        for port in range(1, 1500):
            engine.unsubscribe("E_BENCH", f"udp:127.0.0.1:{port}")
        server.stop()
