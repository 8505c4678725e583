"""Datagram ingest (SPEC section 8): OpenSIPS's own bytes relayed unchanged through
every transport, every rejection counted by reason, a hostile flood survived."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.producer import Engine
from engine.sources.ingest import Ingest
from engine.statistics import SourceStatistics
from tests.helpers.captures import ALL_CAPTURES
from tests.helpers.support import (
    Receiver,
    eventually,
    running_engine,
    settle,
    udp_receiver,
    unix_receiver,
)

VALID = b'{"jsonrpc":"2.0","method":"E_TEST","params":{"ip":"192.168.2.11"}}'


@contextmanager
def ingesting(engine: Engine, listen: list[str], **kw: object) -> Iterator[Ingest]:
    ingest = Ingest(engine, listen, **kw)  # type: ignore[arg-type]
    engine.add_source(ingest)
    ingest.start()
    try:
        yield ingest
    finally:
        ingest.stop()


def sender_for(name: str) -> tuple[socket.socket, str | tuple[str, int]]:
    """A blocking socket that sends to ingest socket `name`, and the address."""
    if name.startswith("unix:"):
        return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), name[5:]
    host, port = name[4:].rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.socket(family, socket.SOCK_DGRAM), (host, int(port))


def by_name(engine: Engine, name: str) -> SourceStatistics:
    return next(s for s in engine.statistics().sources if s.name == name)


def test_every_captured_opensips_datagram_is_relayed_byte_for_byte(tmp_path: Path) -> None:
    events = sorted({json.loads(c.payload)["method"] for c in ALL_CAPTURES})
    receivers: list[Receiver] = [udp_receiver(), udp_receiver("::1"), unix_receiver(tmp_path)]
    listen = ["udp:127.0.0.1:0", "udp:[::1]:0", f"unix:{tmp_path}/ingest.sock"]
    try:
        with running_engine(events) as engine, ingesting(engine, listen) as ingest:
            for event in events:
                for rx in receivers:
                    engine.subscribe(event, rx.socket_text)
            for name in ingest.names:
                sock, address = sender_for(name)
                with sock:
                    for capture in ALL_CAPTURES:
                        sock.sendto(capture.payload, address)
                        time.sleep(0.002)  # UNIX subscribers have a 10-datagram queue
            want = sorted(c.payload for c in ALL_CAPTURES) * 1
            total = len(ALL_CAPTURES) * len(listen)
            for rx in receivers:
                got = rx.quiet(expect=total)
                assert sorted(got) == sorted(want * len(listen)), rx.socket_text
            settle(engine)
            stats = engine.statistics()
            stats.check_identity()
            for name in ingest.names:
                source = by_name(engine, name)
                assert source.received == source.raised == len(ALL_CAPTURES)
    finally:
        for rx in receivers:
            rx.close()


def test_each_rejection_reason_is_counted(tmp_path: Path) -> None:
    rx = udp_receiver()
    path = f"{tmp_path}/ingest.sock"
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            with ingesting(engine, [f"unix:{path}"]) as ingest:
                sock, address = sender_for(ingest.names[0])
                with sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                    for data in (
                        VALID,
                        b"not json",  # malformed
                        VALID.replace(b"}}", b'},"id":1}'),  # a request, not a notification
                        VALID.replace(b"E_TEST", b"E_NOBODY"),  # unknown_event
                        VALID[:-2] + b',"pad":"' + b"x" * 66000 + b'"}}',  # oversize
                    ):
                        sock.sendto(data, address)
                eventually(lambda: by_name(engine, ingest.names[0]).received == 5)
                source = by_name(engine, ingest.names[0])
                assert source.raised == 1
                assert source.rejected == {
                    "malformed": 2, "unknown_event": 1, "oversize": 1,
                    "source_not_allowed": 0, "engine_stopped": 0,
                }  # fmt: skip
            # UDP sources outside [ingest] allow
            with ingesting(engine, ["udp:127.0.0.1:0"], allow=["10.0.0.0/8"]) as ingest:
                sock, address = sender_for(ingest.names[0])
                with sock:
                    sock.sendto(VALID, address)
                eventually(lambda: by_name(engine, ingest.names[0]).received == 1)
                assert by_name(engine, ingest.names[0]).rejected["source_not_allowed"] == 1
            assert [json.loads(d)["method"] for d in rx.quiet(expect=1)] == ["E_TEST"]
            engine.statistics().check_identity()
    finally:
        rx.close()


def test_a_top_level_key_given_twice_is_never_forwarded(tmp_path: Path) -> None:
    """A notification naming two events (or two of any top-level key) is rejected as
    malformed, whichever comes last: a first-key parser (OpenSIPS's cJSON) would read
    another event than the one routed. Keys repeated inside params pass unchanged."""
    a_rx, b_rx = udp_receiver(), udp_receiver()
    path = f"{tmp_path}/ingest.sock"
    repeated = [
        b'{"jsonrpc":"2.0","method":"E_A","method":"E_B","params":{"ip":"1"}}',
        b'{"jsonrpc":"2.0","method":"E_B","params":{"ip":"2"},"method":"E_A"}',
        b'{"jsonrpc": "2.0", "method": "E_A", "method": "E_B"}',
        b'{"jsonrpc":"2.0","method":"E_A","\\u006dethod":"E_B"}',
        b'{"jsonrpc":"2.0","jsonrpc":"2.0","method":"E_A"}',
        b'{"jsonrpc":"2.0","method":"E_B","params":{"ip":"3"},"params":{"ip":"4"}}',
    ]
    forwarded = [
        b'{"jsonrpc":"2.0","method":"E_A","params":{"ip":"5"}}',
        b'{"jsonrpc":"2.0","method":"E_B","params":{"":"a","":"b"}}',  # as OpenSIPS sends
        b'{"jsonrpc": "2.0", "method": "E_B", "params": {"method": "E_A"}}',
    ]
    try:
        with running_engine(["E_A", "E_B"]) as engine:
            engine.subscribe("E_A", a_rx.socket_text)
            engine.subscribe("E_B", b_rx.socket_text)
            with ingesting(engine, [f"unix:{path}"]) as ingest:
                sock, address = sender_for(ingest.names[0])
                with sock:
                    for data in [*repeated, *forwarded]:
                        sock.sendto(data, address)
                total = len(repeated) + len(forwarded)
                eventually(lambda: by_name(engine, ingest.names[0]).received == total)
                source = by_name(engine, ingest.names[0])
                assert source.rejected["malformed"] == len(repeated), source
                assert source.raised == len(forwarded)
            assert a_rx.quiet(expect=1) == forwarded[:1]
            assert b_rx.quiet(expect=2) == forwarded[1:]
            settle(engine)
            engine.statistics().check_identity()
    finally:
        a_rx.close()
        b_rx.close()


def test_a_batch_from_several_sources_is_checked_per_source() -> None:
    # One recvmmsg batch from two loopback addresses, one allowed, in turns: the
    # batch cannot be checked once for all, each datagram is (and relayed in order).
    rx = udp_receiver()
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            with ingesting(engine, ["udp:127.0.0.1:0"], allow=["127.0.0.1/32"]) as ingest:
                (sock,) = ingest.sockets
                senders = []
                for host in ("127.0.0.1", "127.0.0.2"):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind((host, 0))
                    s.connect(sock.sock.getsockname())
                    senders.append(s)
                try:
                    with sock.relay.lock:  # held: the datagrams pile up into one batch
                        for k in range(40):
                            msg = {"jsonrpc": "2.0", "method": "E_TEST", "params": {"k": k}}
                            senders[k % 2].send(json.dumps(msg).encode())
                        time.sleep(0.1)
                finally:
                    for s in senders:
                        s.close()
                eventually(lambda: by_name(engine, ingest.names[0]).received == 40)
                source = by_name(engine, ingest.names[0])
                assert source.raised == 20 and source.rejected["source_not_allowed"] == 20
            got = [json.loads(d)["params"]["k"] for d in rx.quiet(expect=20)]
            assert got == list(range(0, 40, 2))
            engine.statistics().check_identity()
    finally:
        rx.close()


def _hostile(rng: random.Random, count: int) -> tuple[list[bytes], int]:
    """`count` datagrams, most of them hostile; returns them and how many are valid."""
    shapes = [
        lambda: rng.randbytes(rng.randint(0, 200)),
        lambda: VALID[: rng.randint(0, len(VALID) - 1)],  # truncated
        lambda: b'{"jsonrpc":2,"method":"E_TEST"}',  # wrong type
        lambda: b'{"jsonrpc":"2.0","method":["E_TEST"]}',
        lambda: b'{"jsonrpc":"2.0","method":"E_TEST","params":"x"}',
        lambda: b'{"jsonrpc":"2.0","method":"E_TEST","id":7}',
        lambda: VALID.replace(b"E_TEST", b"E_%d" % rng.randint(0, 999)),  # unknown events
        lambda: b'{"jsonrpc":"2.0","method":"E_TEST","params":{"a":"\xff\xfe"}}',  # bad UTF-8
        lambda: b'{"jsonrpc":"2.0","method":"E_TEST","params":' + b"[" * 5000 + b"]" * 5000 + b"}",
        lambda: VALID[:-2] + b',"p":"' + b"y" * 66000 + b'"}}',  # oversize
    ]
    out, valid = [], 0
    for _ in range(count):
        if rng.random() < 0.2:
            out.append(VALID)
            valid += 1
        else:
            out.append(rng.choice(shapes)())
    return out, valid


def test_a_hostile_flood_forwards_only_the_valid_notifications(tmp_path: Path) -> None:
    rx = udp_receiver()
    path = f"{tmp_path}/ingest.sock"
    datagrams, valid = _hostile(random.Random(7), 10_000)
    # Random bytes can be a valid notification only by a miracle; count what is.
    try:
        with running_engine(["E_TEST"]) as engine, ingesting(engine, [f"unix:{path}"]) as ingest:
            engine.subscribe("E_TEST", rx.socket_text)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            sock, address = sender_for(ingest.names[0])  # blocking UNIX: no loss at the door
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                for data in datagrams:
                    sock.sendto(data, address)
            eventually(lambda: by_name(engine, ingest.names[0]).received == len(datagrams), 30)
            source = by_name(engine, ingest.names[0])
            assert source.raised == valid
            assert source.kernel_drops == 0
            assert sum(source.rejected.values()) == len(datagrams) - valid
            assert source.rejected["oversize"] > 0 and source.rejected["unknown_event"] > 0
            assert source.rejected["malformed"] > 0
            got = rx.quiet(expect=valid)
            assert Counter(got) == Counter({VALID: valid})
            # Still serving: the API raise path and the ingest.
            engine.raise_event("E_TEST", {"after": 1})
            assert len(rx.quiet(expect=valid + 1)) == valid + 1
            engine.statistics().check_identity()
        assert not os.path.exists(path)  # removed on exit
    finally:
        rx.close()


def test_a_stale_unix_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(path))
    dead.close()  # the file stays, as after a crash
    with running_engine(["E_TEST"]) as engine, ingesting(engine, [f"unix:{path}"]) as ingest:
        assert ingest.names == [f"unix:{path}"]
        assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_kernel_drops_at_a_full_ingest_socket_are_counted() -> None:
    with running_engine(["E_TEST"]) as engine:
        ingest = Ingest(engine, ["udp:127.0.0.1:0"])
        engine.add_source(ingest)
        # Not started yet: nobody reads, so the socket's queue fills and overflows.
        sock, address = sender_for(ingest.names[0])
        sent = 0
        with sock:
            deadline = time.monotonic() + 10
            while sent < 200_000 and time.monotonic() < deadline:
                sock.sendto(VALID, address)
                sent += 1
        ingest.start()
        try:
            seen = -1
            while seen != by_name(engine, ingest.names[0]).received:  # the queue is read
                seen = by_name(engine, ingest.names[0]).received
                time.sleep(0.3)
            sock, address = sender_for(ingest.names[0])
            with sock:
                sock.sendto(VALID, address)  # carries the drop count (SO_RXQ_OVFL)
            eventually(lambda: by_name(engine, ingest.names[0]).received == seen + 1)
            source = by_name(engine, ingest.names[0])
            assert source.kernel_drops > 0
            assert source.received + source.kernel_drops == sent + 1
        finally:
            ingest.stop()


def test_statistics_while_datagrams_pour_in_never_deadlock() -> None:
    # statistics() (a /metrics scrape) reads each source under the source's lock;
    # the ingest thread holds that lock while it raises. Neither may wait on the other.
    with running_engine(["E_TEST"]) as engine, ingesting(engine, ["udp:127.0.0.1:0"]) as ingest:
        rx = udp_receiver()
        engine.subscribe("E_TEST", rx.socket_text)
        sock, address = sender_for(ingest.names[0])
        done = threading.Event()

        def pour() -> None:
            with sock:
                while not done.is_set():
                    for _ in range(64):
                        sock.sendto(VALID, address)
                    time.sleep(0.001)

        thread = threading.Thread(target=pour, daemon=True)
        thread.start()
        calls, deadline = 0, time.monotonic() + 3
        try:
            while time.monotonic() < deadline:
                engine.statistics()
                calls += 1
        finally:
            done.set()
            thread.join(5)
            rx.close()
        assert calls > 100
        assert by_name(engine, ingest.names[0]).raised > 0
