"""The bench's receiver processes: only complete, valid, fresh datagrams are counted."""

from __future__ import annotations

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
