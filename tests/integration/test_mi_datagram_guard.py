"""The UDP MI is no reflector (issue 17, item 4): real DatagramServers on loopback.

"Nothing came back" is checked without a timer: the server answers datagrams one
at a time in arrival order, so once the reply to a later request is in, a reply
to an earlier datagram would already be in the client's socket (loopback
delivery happens inside sendto); a non-blocking read then says there is none.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from engine.mi.datagram import DatagramServer
from engine.producer import Engine
from tests.helpers.support import running_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with running_engine(["E_SAMPLE"], pin=False, workers=1) as engine:
        yield engine


@pytest.fixture
def server(engine: Engine) -> Iterator[DatagramServer]:
    srv = DatagramServer(engine, ("127.0.0.1", 0))
    srv.start()
    yield srv
    srv.stop()


def client(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(10)
    return sock


def request(method: str, rid: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "id": rid}).encode()


def sync(sock: socket.socket, server: DatagramServer, rid: int = 77) -> dict[str, Any]:
    """A request whose reply must be the next datagram this client reads."""
    sock.sendto(request("version", rid), server.address)
    reply: dict[str, Any] = json.loads(sock.recv(65535))
    assert reply.get("id") == rid, f"an earlier datagram was answered: {reply}"
    return reply


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(65535)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(10)
    return False


def dropped(engine: Engine) -> dict[str, int]:
    return engine.guards.snapshot()[1]


RESPONSES = [
    b"",
    b"   \n",
    b'{"jsonrpc":"2.0","result":"OK","id":1}',
    b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}',
    b'[{"jsonrpc":"2.0","result":"OK","id":1},{"jsonrpc":"2.0","error":{},"id":2}]',
]


def test_empty_and_response_datagrams_are_not_answered(
    engine: Engine, server: DatagramServer
) -> None:
    before = dropped(engine)
    sock = client()
    try:
        for data in RESPONSES:
            sock.sendto(data, server.address)
        sync(sock, server)
        assert nothing_waiting(sock)
        after = dropped(engine)
        assert after["empty"] - before["empty"] == 2
        assert after["response"] - before["response"] == 3
        # A request is still answered, errors included (a batch with one request too).
        sock.sendto(b'[{"jsonrpc":"2.0","result":1,"id":1},{"jsonrpc":"2.0","method":"x","id":2}]',
                    server.address)  # fmt: skip
        assert b'"error"' in sock.recv(65535)
    finally:
        sock.close()


def test_two_mis_pointed_at_each_other_do_not_bounce(engine: Engine) -> None:
    a = DatagramServer(engine, ("127.0.0.1", 0))
    b = DatagramServer(engine, ("127.0.0.1", 0))
    a.start()
    b.start()
    sock = client()
    try:
        before = dropped(engine)["response"]
        # From A's own socket: a request B answers with an error (to A), and a forged-
        # looking reply. Before the guard, A answered B's error, B answered that, ...
        a._sock.sendto(b'{"jsonrpc":"2.0","id":5}', b.address)
        a._sock.sendto(b'{"jsonrpc":"2.0","result":"OK","id":6}', b.address)
        for _ in range(3):  # rounds through both servers: nothing more is dropped
            sync(sock, b)
            sync(sock, a)
        assert dropped(engine)["response"] - before == 2  # B's error at A, the reply at B
    finally:
        sock.close()
        a.stop()
        b.stop()


def test_a_source_outside_datagram_allow_gets_nothing(engine: Engine) -> None:
    srv = DatagramServer(engine, ("127.0.0.1", 0), allow=["127.0.0.1/32"])
    srv.start()
    outsider, insider = client("127.0.0.2"), client("127.0.0.1")
    try:
        before = dropped(engine)["source_not_allowed"]
        outsider.sendto(request("version", 1), srv.address)
        outsider.sendto(b"", srv.address)
        sync(insider, srv)
        assert nothing_waiting(outsider)
        assert dropped(engine)["source_not_allowed"] - before == 2
    finally:
        outsider.close()
        insider.close()
        srv.stop()


def test_error_replies_to_one_source_are_rate_limited(
    engine: Engine, server: DatagramServer
) -> None:
    flood, other = client(), client()
    try:
        before = engine.guards.snapshot()[2]
        for i in range(500):  # well over the burst, and under the socket buffers
            flood.sendto(request("no_such_command", i), server.address)
        sync(other, server)  # another source is still answered
        suppressed = engine.guards.snapshot()[2] - before
        answered = 0
        while not nothing_waiting(flood):
            answered += 1
        assert suppressed > 0 and answered + suppressed == 500
        assert dropped(engine)["rate_limited"] >= suppressed
        assert sync(flood, server)["result"]  # a success is never limited
    finally:
        flood.close()
        other.close()
