"""The fan-out engine end to end: real worker processes, shared memory, sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from engine.producer import EngineError
from engine.wire import PayloadTooLarge, encode_notification
from tests.helpers.support import (
    eventually,
    running_engine,
    settle,
    udp_receiver,
    unique_instance,
    unix_receiver,
)


def seqs(datagrams: list[bytes]) -> list[int]:
    return [json.loads(d)["params"]["seq"] for d in datagrams]


def test_delivery_to_udp4_udp6_and_unix_is_byte_exact(tmp_path: Path) -> None:
    receivers = [udp_receiver(), udp_receiver("::1"), unix_receiver(tmp_path)]
    params = {"ip": "192.168.2.11", "count": 7, "s": 'q"uote é 😀\n'}
    expected = encode_notification("E_PIKE_BLOCKED", params)
    try:
        with running_engine(["E_PIKE_BLOCKED"]) as engine:
            for rx in receivers:
                engine.subscribe("E_PIKE_BLOCKED", rx.socket_text)
            for _ in range(5):
                result = engine.raise_event("E_PIKE_BLOCKED", params)
                assert result.queued and result.pairs == 3
            for rx in receivers:
                assert rx.wait_for(5) == [expected] * 5
            settle(engine)
            engine.statistics().check_identity()
    finally:
        for rx in receivers:
            rx.close()


@pytest.mark.parametrize("subscribers", [1, 8])
def test_subscribers_spread_over_two_workers_each_get_every_event(
    tmp_path: Path, subscribers: int
) -> None:
    receivers = [udp_receiver() for _ in range(subscribers)]
    try:
        with running_engine(["E_TEST"], workers=2) as engine:
            for rx in receivers:
                engine.subscribe("E_TEST", rx.socket_text)
            for seq in range(200):
                engine.raise_event("E_TEST", {"seq": seq})
            for rx in receivers:
                assert seqs(rx.wait_for(200)) == list(range(200))
            settle(engine)
            stats = engine.statistics()
            stats.check_identity()
            assert stats.pairs_sent == 200 * subscribers
            if subscribers > 1:
                assert all(w.subscribers == subscribers // 2 for w in stats.workers)
    finally:
        for rx in receivers:
            rx.close()


def test_subscribe_and_unsubscribe_take_effect_exactly_at_their_position() -> None:
    early, late = udp_receiver(), udp_receiver()
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", early.socket_text)
            for seq in range(100):
                if seq == 50:
                    engine.unsubscribe("E_TEST", early.socket_text)
                    engine.subscribe("E_TEST", late.socket_text)
                engine.raise_event("E_TEST", {"seq": seq})
            assert seqs(early.wait_for(50)) == list(range(50))
            assert seqs(late.wait_for(50)) == list(range(50, 100))
            settle(engine)
            time.sleep(0.1)
            assert len(early.datagrams) == 50 and len(late.datagrams) == 50
            engine.statistics().check_identity()
    finally:
        early.close()
        late.close()


def test_mixed_events_in_one_batch_reach_only_their_subscribers_in_order() -> None:
    only_a, only_b, both = udp_receiver(), udp_receiver(), udp_receiver()
    try:
        with running_engine(["E_A", "E_B"]) as engine:
            engine.subscribe("E_A", only_a.socket_text)
            engine.subscribe("E_B", only_b.socket_text)
            engine.subscribe("E_A", both.socket_text)
            engine.subscribe("E_B", both.socket_text)
            for seq in range(300):
                engine.raise_event("E_A" if seq % 3 else "E_B", {"seq": seq})
            a = [s for s in range(300) if s % 3]
            b = [s for s in range(300) if not s % 3]
            assert seqs(only_a.wait_for(len(a))) == a
            assert seqs(only_b.wait_for(len(b))) == b
            assert seqs(both.wait_for(300)) == list(range(300))
            settle(engine)
            stats = engine.statistics()
            stats.check_identity()
            sent = stats.sent_by_event()
            assert sent[("E_A", "udp")][0] == 2 * len(a)
            assert sent[("E_B", "udp")][0] == 2 * len(b)
    finally:
        for rx in (only_a, only_b, both):
            rx.close()


def test_per_subscriber_counts_follow_each_subscriber(tmp_path: Path) -> None:
    first, second = udp_receiver(), udp_receiver()
    missing = f"unix:{tmp_path / 'nobody.sock'}"
    try:
        with running_engine(["E_A", "E_B"], workers=2) as engine:
            engine.subscribe("E_A", first.socket_text)
            engine.subscribe("E_B", first.socket_text)
            engine.subscribe("E_A", second.socket_text)
            engine.subscribe("E_A", missing)
            for seq in range(30):
                engine.raise_event("E_A" if seq % 3 else "E_B", {"seq": seq})
            first.wait_for(30)
            second.wait_for(20)
            settle(engine)
            counts = engine.subscriber_counts()
            assert counts == {
                first.socket_text: (30, 0),
                second.socket_text: (20, 0),
                missing: (0, 20),
            }
    finally:
        first.close()
        second.close()


def test_portable_send_path_delivers_the_same_bytes(tmp_path: Path) -> None:
    receivers = [udp_receiver(), unix_receiver(tmp_path)]
    try:
        with running_engine(["E_TEST"], use_sendmmsg=False) as engine:
            for rx in receivers:
                engine.subscribe("E_TEST", rx.socket_text)
            for seq in range(5):
                engine.raise_event("E_TEST", {"seq": seq})
            for rx in receivers:
                assert seqs(rx.wait_for(5)) == list(range(5))
            settle(engine)
            engine.statistics().check_identity()
    finally:
        for rx in receivers:
            rx.close()


def test_dead_and_stuck_subscribers_do_not_hold_back_the_others(tmp_path: Path) -> None:
    healthy = udp_receiver()
    # A UNIX receiver that never reads: its queue (net.unix.max_dgram_qlen) fills up.
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.bind(str(tmp_path / "stuck.sock"))
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nobody listens there: ICMP port unreachable -> ECONNREFUSED
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", healthy.socket_text)
            engine.subscribe("E_TEST", f"unix:{tmp_path / 'stuck.sock'}")
            engine.subscribe("E_TEST", f"udp:127.0.0.1:{closed_port}")
            engine.subscribe("E_TEST", f"unix:{tmp_path / 'missing.sock'}")
            n = 2000
            for seq in range(n):
                engine.raise_event("E_TEST", {"seq": seq})
                if seq % 100 == 99:
                    time.sleep(0.01)  # spread over batches: ICMP errors come back between
            assert seqs(healthy.wait_for(n)) == list(range(n))
            settle(engine)
            stats = engine.statistics()
            stats.check_identity()
            failures = stats.workers[0].failures
            assert failures[("unix", "eagain")] > 0  # the stuck receiver's full queue
            assert failures[("unix", "enoent")] == n  # the missing path, every time
            assert failures[("udp", "econnrefused")] > 0  # the closed port
            assert stats.pairs_sent + stats.pairs_failed == 4 * n
    finally:
        healthy.close()
        stuck.close()


UNIX_READER = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
sock.settimeout(5)
print("ready", flush=True)
raw = []  # decoded after the burst: the reader must keep up, not parse
try:
    while len(raw) < int(sys.argv[2]):
        raw.append(sock.recv(70000))
except TimeoutError:
    pass
print(json.dumps([json.loads(d)["params"]["seq"] for d in raw]), flush=True)
"""


def test_a_reading_unix_receiver_gets_a_whole_burst_despite_its_short_queue(
    tmp_path: Path,
) -> None:
    # net.unix.max_dgram_qlen is often 10: a burst of batches overflows the queue
    # unless the worker waits (within engine.unix_wait_ms) for the receiver to read.
    path = str(tmp_path / "reader.sock")
    reader = subprocess.Popen(
        [sys.executable, "-c", UNIX_READER, path, "2000"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "ready\n"
        # A generous wait budget: on a busy 2-core machine the reader may be off its
        # CPU for more than the default 5 ms; the mechanism is the same.
        with running_engine(["E_TEST"], unix_wait_ms=250) as engine:
            engine.subscribe("E_TEST", f"unix:{path}")
            for seq in range(2000):
                engine.raise_event("E_TEST", {"seq": seq})
            settle(engine)
            stats = engine.statistics()
            stats.check_identity()
            assert stats.pairs_failed == 0, stats.workers[0].failures
        assert json.loads(reader.stdout.readline()) == list(range(2000))
    finally:
        reader.kill()
        reader.wait(5)


def test_a_killed_worker_is_back_within_a_second_and_no_event_is_lost() -> None:
    receivers = [udp_receiver(), udp_receiver()]
    n = 6000
    try:
        with running_engine(["E_TEST"], workers=2) as engine:
            for rx in receivers:
                engine.subscribe("E_TEST", rx.socket_text)
            stop = threading.Event()

            def produce() -> None:
                for seq in range(n):
                    result = engine.raise_event("E_TEST", {"seq": seq})
                    assert result.queued
                    if seq % 50 == 49:
                        time.sleep(0.002)
                stop.set()

            producer = threading.Thread(target=produce)
            producer.start()
            eventually(lambda: len(receivers[0].datagrams) > 1000, what="stream under way")
            victim = engine.statistics().workers[0]
            assert victim.pid is not None
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            eventually(
                lambda: engine.supervisor.ready(0) and engine.supervisor.pid_of(0) != victim.pid,
                timeout=5,
                what="worker restart",
            )
            back_in = time.monotonic() - killed_at
            producer.join(60)
            assert stop.is_set()
            settle(engine)
            for rx in receivers:
                got = Counter(seqs(rx.quiet(n)))
                assert set(got) == set(range(n)), "an accepted event was lost"
            stats = engine.statistics()
            stats.check_identity()
            assert stats.workers[0].restarts == 1
            duplicates = sum(
                c - 1 for rx in receivers for c in Counter(seqs(rx.datagrams)).values()
            )
            assert duplicates <= sum(w.redelivered_pairs for w in stats.workers)
            # Reported, not asserted (the machine is shared): the issue asks for < 1 s.
            print(f"worker back in {back_in:.3f} s; {duplicates} duplicate datagram(s)")
    finally:
        for rx in receivers:
            rx.close()


def test_full_ring_drops_are_counted_and_the_producer_does_not_block() -> None:
    rx = udp_receiver()
    try:
        with running_engine(["E_TEST"], ring_bytes=262144) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # the worker stalls; its ring fills up
            try:
                results = [
                    engine.raise_event("E_TEST", {"seq": s, "pad": "x" * 200}) for s in range(3000)
                ]
            finally:
                os.kill(pid, signal.SIGCONT)
            queued = [s for s, r in enumerate(results) if r.queued]
            dropped = [s for s, r in enumerate(results) if not r.queued]
            assert dropped and queued
            settle(engine)
            got = rx.quiet(len(queued))
            assert seqs(got) == queued  # complete, valid payloads; nothing half-written
            stats = engine.statistics()
            stats.check_identity()
            assert stats.drops["ring_full"] == len(dropped)
            assert stats.workers[0].records_dropped == len(dropped)
            assert stats.workers[0].ring.drops == len(dropped)
    finally:
        rx.close()


def test_wait_policy_waits_a_bounded_time_then_drops() -> None:
    rx = udp_receiver()
    try:
        with running_engine(
            ["E_TEST"], ring_bytes=262144, full_ring_policy="wait", full_ring_wait_ms=20
        ) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                results = [
                    engine.raise_event("E_TEST", {"seq": s, "pad": "x" * 500}) for s in range(600)
                ]
            finally:
                os.kill(pid, signal.SIGCONT)
            assert any(not r.queued for r in results)
            settle(engine)
            engine.statistics().check_identity()
    finally:
        rx.close()


def test_oversize_and_unsubscribed_events_are_accounted() -> None:
    rx = udp_receiver()
    try:
        with running_engine(["E_TEST", "E_NOBODY"]) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            with pytest.raises(PayloadTooLarge) as info:
                engine.raise_event("E_TEST", {"big": "x" * 70000})
            assert info.value.size > 65457
            assert engine.raise_event("E_NOBODY", {"seq": 0}).no_subscribers
            engine.raise_event("E_TEST", {"seq": 1})
            assert seqs(rx.wait_for(1)) == [1]
            settle(engine)
            stats = engine.statistics()
            stats.check_identity()
            assert stats.events_oversize == {"E_TEST": 1, "E_NOBODY": 0}
            assert stats.drops["no_subscribers"] == 1
            assert stats.raised == 3
    finally:
        rx.close()


def test_stop_drains_every_queued_event() -> None:
    rx = udp_receiver()
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            for seq in range(5000):
                engine.raise_event("E_TEST", {"seq": seq})
        # running_engine stopped it (and checked no segment is left)
        final = engine.final_statistics
        assert final is not None
        final.check_identity()
        assert final.pairs_sent == 5000, final.workers[0].failures
        assert final.workers[0].pairs_in_ring == 0
        assert seqs(rx.quiet(5000)) == list(range(5000))
    finally:
        rx.close()


def bound_udp_sockets(count: int) -> list[socket.socket]:
    """Non-blocking UDP sockets bound to free loopback ports (plain receivers)."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        socks.append(sock)
    return socks


def drained(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on a non-blocking socket."""
    got = []
    while True:
        try:
            got.append(sock.recv(2048))
        except BlockingIOError:
            return got


def test_two_thousand_subscribers() -> None:
    socks = bound_udp_sockets(2000)
    try:
        for limit in (0, 100):  # all connected; then 100 connected + shared sockets
            with running_engine(["E_TEST"], socket_limit=limit) as engine:
                for sock in socks:
                    engine.subscribe("E_TEST", f"udp:127.0.0.1:{sock.getsockname()[1]}")
                for seq in range(3):
                    engine.raise_event("E_TEST", {"seq": seq})
                settle(engine)
                stats = engine.statistics()
                stats.check_identity()
                assert stats.pairs_sent == 6000 and stats.pairs_failed == 0
            for sock in socks:
                assert seqs(drained(sock)) == [0, 1, 2]
    finally:
        for sock in socks:
            sock.close()


OUT_OF_DESCRIPTORS = """
import json, resource, sys
from engine.options import EngineOptions
from engine.producer import Engine
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))  # the worker inherits it
engine = Engine(EngineOptions(instance=sys.argv[1], socket_limit=1000), events=["E_TEST"])
engine.start()
try:
    for port in json.loads(sys.argv[2]):
        engine.subscribe("E_TEST", f"udp:127.0.0.1:{port}")
    for seq in range(2):
        engine.raise_event("E_TEST", {"seq": seq})
finally:
    engine.stop()
stats = engine.statistics()
print(json.dumps([stats.pairs_sent, stats.pairs_failed, stats.identity_errors()]))
"""


def test_a_worker_out_of_descriptors_shares_a_socket_instead_of_crashing() -> None:
    socks = bound_udp_sockets(300)
    try:
        ports = json.dumps([s.getsockname()[1] for s in socks])
        out = subprocess.run(
            [sys.executable, "-c", OUT_OF_DESCRIPTORS, unique_instance("fd"), ports],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        sent, failed, errors = json.loads(out.stdout)
        assert (sent, failed, errors) == (600, 0, []), out.stderr[-3000:]
        assert "no socket of its own" in out.stderr
        for sock in socks:
            assert seqs(drained(sock)) == [0, 1]
    finally:
        for sock in socks:
            sock.close()


def test_second_engine_with_the_same_instance_is_refused() -> None:
    with running_engine(["E_TEST"]) as engine:
        from engine.producer import Engine

        twin = Engine(engine.options, events=["E_TEST"])
        with pytest.raises(EngineError, match="already running"):
            twin.start()
        # the refused twin must not have touched the running engine's segments
        rx = udp_receiver()
        try:
            engine.subscribe("E_TEST", rx.socket_text)
            engine.raise_event("E_TEST", {"seq": 0})
            assert seqs(rx.wait_for(1)) == [0]
        finally:
            rx.close()


def test_raise_after_stop_is_an_error() -> None:
    with running_engine(["E_TEST"]) as engine:
        pass
    with pytest.raises(EngineError, match="not running"):
        engine.raise_event("E_TEST", {"seq": 0})
