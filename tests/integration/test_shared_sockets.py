"""Subscribers beyond the connected-socket limit share one unconnected socket per
family: one sendmmsg per event reaches them all, in order, and they are counted."""

from __future__ import annotations

import json
import socket

import psutil

from engine.supervisor import auto_socket_limit
from tests.helpers.support import running_engine, settle

SUBSCRIBERS = 3000
LIMIT = 100
EVENTS = 10


def test_thousands_of_subscribers_share_sockets_and_all_get_every_event_in_order() -> None:
    sinks = []
    for _ in range(SUBSCRIBERS):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        sink.setblocking(False)
        sinks.append(sink)
    try:
        with running_engine(socket_limit=LIMIT) as engine:
            for sink in sinks:
                engine.subscribe("E_TEST", f"udp:127.0.0.1:{sink.getsockname()[1]}")
            for seq in range(EVENTS):
                engine.raise_event("E_TEST", {"seq": seq})
            settle(engine, timeout=30)
            stats = engine.statistics()
            stats.check_identity()
            worker = stats.workers[0]
            assert worker.subscribers == SUBSCRIBERS
            assert worker.shared_subscribers == SUBSCRIBERS - LIMIT
            assert stats.pairs_sent == SUBSCRIBERS * EVENTS
            assert stats.pairs_failed == 0
            # The worker holds LIMIT connected sockets, not one per subscriber.
            assert worker.pid is not None
            udp = [c for c in psutil.Process(worker.pid).net_connections("udp")]
            assert LIMIT <= len(udp) <= LIMIT + 8, len(udp)
        missing = []
        for i, sink in enumerate(sinks):
            got = []
            while True:
                try:
                    got.append(json.loads(sink.recv(1000))["params"]["seq"])
                except BlockingIOError:
                    break
            if got != list(range(EVENTS)):
                missing.append((i, got))
        assert missing == []
    finally:
        for sink in sinks:
            sink.close()


def test_the_default_limit_leaves_most_ephemeral_ports_to_the_host() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(x) for x in f.read().split())
    ports = high - low + 1
    for workers in (1, 2, 8):
        assert auto_socket_limit(workers) * workers <= ports // 4 + 64 * workers
