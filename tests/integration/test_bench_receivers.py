"""The bench's receiver processes: only complete, valid, fresh datagrams are counted."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from engine.bench.common import EVENT, SEQ_BASE, bench_params, make_tag
from engine.bench.receivers import ReceiverPool, RoundSpec
from engine.wire import encode_notification


def test_receivers_count_only_complete_valid_datagrams(tmp_path: Path) -> None:
    pool = ReceiverPool(["udp", "unix"], 1, str(tmp_path), 1 << 20, 2048, None, 60.0)
    try:
        t0 = time.monotonic_ns()
        tag = make_tag(120, t0)
        pool.begin(RoundSpec("latency", t0, tag, EVENT, SEQ_BASE))
        good = [encode_notification(EVENT, bench_params(tag, SEQ_BASE + i, t0 + 1)) for i in (0, 1)]
        stale = encode_notification(EVENT, bench_params(tag, SEQ_BASE + 2, t0 - 1))
        bad = [good[0][:-3], b"not json", good[0].replace(b"E_BENCH", b"E_OTHER")]
        host, port = pool.sockets[0].removeprefix("udp:").rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for data in [*good, good[0], stale, *bad]:
                s.sendto(data, (host, int(port)))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(good[1], pool.sockets[1].removeprefix("unix:"))
        pool.settle(8)
        report = pool.report()
    finally:
        pool.close()
    udp, unix = report.sockets
    assert (udp["received"], udp["duplicates"], udp["stale"], udp["invalid"]) == (3, 1, 1, 3)
    assert (unix["received"], unix["invalid"]) == (1, 0)
    assert len(report.latencies_ns) == 4
    assert not list(tmp_path.glob("*.sock")), "receiver socket files left behind"


def test_kernel_drops_at_a_full_receiver_socket_are_counted_per_socket(tmp_path: Path) -> None:
    """A receiver that cannot keep up (stopped, with a tiny SO_RCVBUF) loses datagrams in
    the kernel: each one is reported as that socket's `kernel_drops`, so that
    sent = received + kernel_drops holds exactly and none of it is blamed on the sender."""
    pool = ReceiverPool(["udp", "udp6"], 1, str(tmp_path), 4096, 2048, None, 60.0)
    sent = 500
    try:
        t0 = time.monotonic_ns()
        tag = make_tag(120, t0)
        pool.begin(RoundSpec("seq", t0, tag, EVENT, SEQ_BASE))
        pid = pool.pids[0]
        os.kill(pid, signal.SIGSTOP)  # the receiver reads nothing while the buffer fills
        try:
            for text, family in zip(pool.sockets, (socket.AF_INET, socket.AF_INET6), strict=True):
                host, port = text.removeprefix("udp:").rsplit(":", 1)
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    for i in range(sent):
                        data = encode_notification(EVENT, bench_params(tag, SEQ_BASE + i, t0 + 1))
                        s.sendto(data, (host.strip("[]"), int(port)))
        finally:
            os.kill(pid, signal.SIGCONT)
        pool.settle(2 * sent)
        report = pool.report()
    finally:
        pool.close()
    for counts in report.sockets:
        assert counts["kernel_drops"] > 0, "a 4 KiB buffer cannot hold 500 datagrams"
        assert counts["received"] > 0
        assert counts["received"] + counts["kernel_drops"] == sent
