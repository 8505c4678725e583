"""engine/guards.py: which destinations reach one of the engine's own sockets."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from engine.address import parse_destination
from engine.errors import SelfSubscription
from engine.guards import Guards, OwnSockets

HOST = ipaddress.ip_address("192.0.2.7")  # "this host's" address (TEST-NET-1)
HOST6 = ipaddress.ip_address("2001:db8::7")


def own() -> OwnSockets:
    return OwnSockets(local_addresses=lambda: {HOST, HOST6})


@pytest.mark.parametrize(
    ("bound", "dest", "loops"),
    [
        (("127.0.0.1", 9050), "udp:127.0.0.1:9050", True),
        (("127.0.0.1", 9050), "udp:localhost:9050", True),
        (("127.0.0.1", 9050), "udp:0.0.0.0:9050", True),
        (("127.0.0.1", 9050), "udp:[::ffff:127.0.0.1]:9050", True),
        (("127.0.0.1", 9050), "udp:127.0.0.1:9051", False),
        (("127.0.0.1", 9050), "udp:127.0.0.2:9050", False),  # nothing listens there
        (("127.0.0.1", 9050), "udp:[::1]:9050", False),
        (("0.0.0.0", 9050), "udp:127.0.0.2:9050", True),
        (("0.0.0.0", 9050), "udp:192.0.2.7:9050", True),
        (("0.0.0.0", 9050), "udp:[::ffff:192.0.2.7]:9050", True),
        (("0.0.0.0", 9050), "udp:192.0.2.8:9050", False),
        (("0.0.0.0", 9050), "udp:[::1]:9050", False),  # an IPv4 wildcard takes no IPv6
        (("::", 9050), "udp:[::1]:9050", True),
        (("::", 9050), "udp:[::]:9050", True),
        (("::", 9050), "udp:127.0.0.1:9050", True),  # dual stack
        (("::", 9050), "udp:[2001:db8::7]:9050", True),
        (("::", 9050), "udp:[2001:db8::8]:9050", False),
        (("::1", 9050), "udp:127.0.0.1:9050", False),
        (("::ffff:127.0.0.1", 9050), "udp:127.0.0.1:9050", True),
    ],
)
def test_udp_spellings(bound: tuple[str, int], dest: str, loops: bool) -> None:
    sockets = own()
    sockets.add("ingest socket", bound)
    d = parse_destination(dest)
    assert (sockets.match(d) is not None) is loops
    if loops:
        with pytest.raises(SelfSubscription, match="this engine's own ingest socket"):
            sockets.check(d)


def test_port_zero_waits_for_the_bound_port() -> None:
    sockets = own()
    assert sockets.add("MI datagram", ("127.0.0.1", 0)) is None
    assert sockets.endpoints == []


def test_unix_paths_by_real_path_and_inode(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "ingest.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        sockets = own()
        sockets.add("ingest socket", str(path))
        (tmp_path / "link").symlink_to(path)
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "up").symlink_to(tmp_path)
        (tmp_path / "hard.sock").hardlink_to(path)
        for text in (
            f"unix:{path}",
            f"{tmp_path}//./ingest.sock",
            f"unix:{tmp_path / 'link'}",
            f"unix:{tmp_path / 'd' / 'up' / 'ingest.sock'}",
            f"unix:{tmp_path / 'hard.sock'}",
        ):
            assert sockets.match(parse_destination(text)) is not None, text
        assert sockets.match(parse_destination(f"unix:{tmp_path / 'other.sock'}")) is None
    finally:
        sock.close()


def test_counters() -> None:
    guards = Guards(own())
    guards.count_self_refused("state")
    guards.count_mi_datagram_dropped("empty")
    guards.count_mi_datagram_dropped("rate_limited")
    refused, dropped, suppressed = guards.snapshot()
    assert refused == {"subscribe": 0, "state": 1, "listener": 0}
    assert dropped == {"source_not_allowed": 0, "empty": 1, "response": 0, "rate_limited": 1}
    assert suppressed == 1
