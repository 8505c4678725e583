"""wake.c's chain in Python: what the interpreter itself costs the first event after a
pause, beside the C chain and the engine in the bench's idle phase.

A (pinned to CPU 0) stamps the time in shared memory and rings an eventfd; B (pinned
to CPU 1, blocked reading the eventfd) sends one UDP datagram carrying the stamp
with socket.send to C (blocked in recv, unpinned), which records now - stamp. The
same steps as wake.c, each the cheapest Python has (built-ins, no ctypes), so the
engine's idle latency reads against both the kernel's floor (wake.c) and CPython's.

    python -m engine.bench.probes.py_wake [N=100] [GAP_MS=50]

prints wake.c's line: "n=N gap=GAPms: p50 .. us, p90 .. us, p99 .. us, max .. us".
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import sys
import time


def _pin(cpu: int) -> None:
    with contextlib.suppress(OSError):  # fewer CPUs: run where allowed
        os.sched_setaffinity(0, {cpu})


def main(n: int = 100, gap_ms: int = 50) -> str:
    shared = mmap.mmap(-1, 4096)
    words = memoryview(shared).cast("Q")  # [0] sequence, [1] stamp
    bell = os.eventfd(0)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    results_r, results_w = os.pipe()
    receiver = os.fork()
    if receiver == 0:  # C: blocked in recv, unpinned
        got = []
        for _ in range(n):
            data = rx.recv(64)
            got.append(time.monotonic_ns() - struct.unpack_from("q", data)[0])
        os.write(results_w, struct.pack(f"{n}q", *got))
        os._exit(0)
    sender = os.fork()
    if sender == 0:  # B: asleep on the eventfd, on the other CPU
        _pin(1)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.connect(rx.getsockname())
        for _ in range(n):
            os.eventfd_read(bell)
            tx.send(struct.pack("q", words[1]))
        os._exit(0)
    _pin(0)
    for i in range(n):
        time.sleep(gap_ms / 1000)
        words[1] = time.monotonic_ns()
        words[0] = i + 1
        os.eventfd_write(bell, 1)
    os.waitpid(sender, 0)
    os.waitpid(receiver, 0)
    raw = b""
    while len(raw) < 8 * n:
        raw += os.read(results_r, 8 * n - len(raw))
    lat = sorted(struct.unpack(f"{n}q", raw))
    words.release()
    shared.close()

    def us(ns: int) -> int:
        return round(ns / 1000)

    return (
        f"n={n} gap={gap_ms}ms: p50 {us(lat[n // 2])} us, p90 {us(lat[n * 9 // 10])} us, "
        f"p99 {us(lat[n * 99 // 100])} us, max {us(lat[-1])} us"
    )


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    gap = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    print(main(max(2, count), max(1, gap)))
