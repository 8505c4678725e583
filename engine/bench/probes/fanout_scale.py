"""Fan-out to tens of thousands of UDP subscribers: ports, sharing, rate, stop.

    python -m engine.bench.probes.fanout_scale [--subscribers 50000] [--events 40]

Sink processes bind the subscriber sockets on 127.0.0.2, 127.0.0.3, ... at ports
below the ephemeral range (2000 + i), so the sinks themselves take no ephemeral
port; they never read (the kernel drops what they do not take: a sent datagram
is what is measured). One engine with one worker subscribes them all, checks
that another program can still open 1,000 connected UDP sockets, raises
`--events` events and reports, as one JSON line: subscribe time, the sockets the
engine holds, the shared subscribers, datagrams sent per second, stop time.
Loopback only; every process it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

from engine.options import EngineOptions
from engine.producer import Engine

SINK = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
count, ip = int(sys.argv[1]), sys.argv[2]
socks = []
for k in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((ip, 2000 + k))
    socks.append(s)
print(" ".join(f"{ip}:{2000 + k}" for k in range(count)), flush=True)
time.sleep(600)
"""
PER_SINK = 16_000  # sockets per sink process (its open-files limit), ports 2000-17999


def _udp_sockets() -> int:
    with open("/proc/net/udp") as f:
        return sum(1 for _ in f) - 1


def _ephemeral_ports() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(x) for x in f.read().split())
    return high - low + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.probes.fanout_scale")
    parser.add_argument("--subscribers", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=40)
    args = parser.parse_args(argv)
    sinks: list[subprocess.Popen[str]] = []
    destinations: list[str] = []
    try:
        for i in range(0, args.subscribers, PER_SINK):
            count = min(PER_SINK, args.subscribers - i)
            ip = f"127.0.0.{2 + i // PER_SINK}"
            sink = subprocess.Popen(
                [sys.executable, "-c", SINK, str(count), ip], stdout=subprocess.PIPE, text=True
            )
            sinks.append(sink)
            assert sink.stdout is not None
            destinations += sink.stdout.readline().split()
        before = _udp_sockets()
        opts = EngineOptions(instance="fanoutscale", workers=1, max_pending_datagrams=2_000_000)
        engine = Engine(opts, events=["E_SCALE"])
        engine.start()
        try:
            start = time.monotonic()
            for dest in destinations:
                engine.subscribe("E_SCALE", f"udp:{dest}")
            deadline = time.monotonic() + 120
            while engine.statistics().workers[0].subscribers < len(destinations):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            subscribe_s = time.monotonic() - start
            worker = engine.statistics().workers[0]
            held = _udp_sockets() - before
            probes = []  # does the host still have ports for others?
            for _ in range(1000):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probe.connect(("127.0.0.1", 9))
                probes.append(probe)
            for probe in probes:
                probe.close()
            sent_before = engine.statistics().pairs_sent
            start = time.monotonic()
            for seq in range(args.events):
                engine.raise_event("E_SCALE", {"seq": seq})
            while engine.statistics().workers[0].ring.used_bytes:
                time.sleep(0.01)
            seconds = time.monotonic() - start
            stats = engine.statistics()
            stats.check_identity()
        finally:
            stop_start = time.monotonic()
            engine.stop()
            stop_s = time.monotonic() - stop_start
        sent = stats.pairs_sent - sent_before
        print(
            json.dumps(
                {
                    "subscribers": len(destinations),
                    "subscribe_s": round(subscribe_s, 2),
                    "shared_subscribers": worker.shared_subscribers,
                    "udp_sockets_held_by_engine": held,
                    "ephemeral_ports": _ephemeral_ports(),
                    "others_opened_1000_connected_udp_sockets": True,
                    "datagrams_sent": sent,
                    "send_failures": stats.pairs_failed,
                    "datagrams_per_s": round(sent / seconds),
                    "stop_s": round(stop_s, 2),
                }
            )
        )
        return 0
    finally:
        for sink in sinks:
            sink.kill()
            sink.wait(5)


if __name__ == "__main__":
    sys.exit(main())
