"""The bench's reference senders, run in one separate process.

* **naive**: what a straightforward Python sender does, and what OpenSIPS does in
  C: for every event and every subscriber, `json.dumps` the notification and
  `socket.sendto` it (one unconnected socket per address family, non-blocking
  like the engine, so a full receiver costs a counted failure, never a stall).
  No batching, no second process. `encode_once=True` encodes once per event
  instead (the stricter comparison: only the sending differs).
* **ceiling**: the most a single Python process gets out of the kernel: the
  payloads are encoded before the clock starts, and every subscriber gets them
  256 at a time with one `sendmmsg(2)` on a connected non-blocking socket
  (`workers.sender.BatchSender`, the engine's own send path, minus the ring, the
  accounting and everything else). Receivers check these datagrams too, but do
  not count sequence numbers (the same 256 are sent again and again).
* **ingest**: not a reference but the ingest contender's emitter: what an
  OpenSIPS with one event_datagram subscriber (the engine's ingest socket) sends.
  The E_BENCH notification is encoded once; per datagram only its `seq` and `t`
  digits are rewritten in place (same width, so the same bytes the API contender
  would encode), and batches of up to 256 go out with one `sendmmsg(2)` on a
  connected non-blocking socket, as fast as possible or paced at the rate.

The parent sends ("naive" | "ceiling", RunSpec) or ("ingest", IngestSpec) and gets
a result dict back;
("exit",) ends the process. Every loop is bounded by the round's duration and
MAX_EVENTS_PER_ROUND.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any, Final

import msgspec

from engine.address import parse_destination
from engine.bench.common import (
    EVENT,
    MAX_EVENTS_PER_ROUND,
    PACE_TICK_S,
    PR_SET_TIMERSLACK,
    SEQ_BASE,
    Child,
    bench_params,
    prctl,
    prepare_child,
)
from engine.wire import encode_notification
from workers.sender import BatchSender

CHECK_EVERY: Final = 64  # events between two looks at the clock
CEILING_BATCH: Final = 256
INGEST_BATCH: Final = 256


class RunSpec(msgspec.Struct, frozen=True):
    sockets: list[str]  # subscriber socket strings
    duration_s: float
    rate: float  # events/s; 0 = as fast as possible (naive only)
    tag: str
    encode_once: bool = False


class IngestSpec(msgspec.Struct, frozen=True):
    address: tuple[str, int]  # the engine's ingest socket (UDP), as bound
    duration_s: float
    rate: float  # events/s; 0 = as fast as possible
    tag: str
    sched_idle: bool = False  # emit under SCHED_IDLE: only on CPU time no one else wants


def _targets(sockets: list[str], connect: bool) -> list[tuple[socket.socket, Any]]:
    """(socket, address) per subscriber: shared per family, or one connected each."""
    shared: dict[int, socket.socket] = {}
    out: list[tuple[socket.socket, Any]] = []
    for text in sockets:
        dest = parse_destination(text)
        family = dest.family
        address: Any = dest.sockaddr if isinstance(dest.sockaddr, str) else tuple(dest.sockaddr)
        if connect:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(address)
        else:
            sock = shared.get(family) or socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            shared[family] = sock
        out.append((sock, address))
    return out


def _errname(exc: OSError, sock: socket.socket) -> str:
    return _failure(exc.errno or 0, sock)


def _failure(err: int, sock: socket.socket) -> str:
    """A failed send's key: the errno's name, "unix:" before it on a UNIX socket (a
    full UNIX receiver refuses with EAGAIN: the receiver's overflow, not the sender's)."""
    name = errno.errorcode.get(err, "other").lower()
    return f"unix:{name}" if sock.family == socket.AF_UNIX else name


def run_naive(spec: RunSpec) -> dict[str, Any]:
    targets = _targets(spec.sockets, connect=False)
    dumps = json.dumps
    failures: dict[str, int] = {}
    tag = spec.tag
    rate = spec.rate
    sent = events = 0
    seq = SEQ_BASE
    t0 = time.monotonic_ns()
    end = t0 + int(spec.duration_s * 1e9)
    try:
        while events < MAX_EVENTS_PER_ROUND:
            now = time.monotonic_ns()
            if now >= end:
                break
            if rate:
                due = int((now - t0) * rate / 1e9) + 1 - events
                if due <= 0:
                    wait = (t0 + (events * 1e9) / rate - now) / 1e9
                    time.sleep(max(wait, PACE_TICK_S))  # never spin: CPUs are shared
                    continue
                count = min(due, CHECK_EVERY)
            else:
                count = CHECK_EVERY
            for _ in range(count):
                params = bench_params(tag, seq, time.monotonic_ns())
                once = None
                if spec.encode_once:
                    note = {"jsonrpc": "2.0", "method": EVENT, "params": params}
                    once = dumps(note, separators=(",", ":")).encode()
                for sock, address in targets:
                    if once is None:
                        note = {"jsonrpc": "2.0", "method": EVENT, "params": params}
                        data = dumps(note, separators=(",", ":")).encode()
                    else:
                        data = once
                    try:
                        sock.sendto(data, address)
                        sent += 1
                    except OSError as exc:
                        name = _errname(exc, sock)
                        failures[name] = failures.get(name, 0) + 1
                seq += 1
            events += count
        t_end = time.monotonic_ns()
    finally:
        for sock in {id(s): s for s, _ in targets}.values():
            sock.close()
    return {"events": events, "sent": sent, "failures": failures, "t0_ns": t0, "t_end_ns": t_end}


def run_ceiling(spec: RunSpec) -> dict[str, Any]:
    targets = _targets(spec.sockets, connect=True)
    t0 = time.monotonic_ns()
    payloads = [
        encode_notification(EVENT, bench_params(spec.tag, SEQ_BASE + i, t0))
        for i in range(CEILING_BATCH)
    ]
    slot = max(len(p) for p in payloads) + 8
    data = bytearray(slot * CEILING_BATCH)
    for i, p in enumerate(payloads):
        data[i * slot : i * slot + len(p)] = p
    view = memoryview(data)
    sender = BatchSender(view, CEILING_BATCH)
    failures: dict[str, int] = {}
    sent = events = 0
    end = t0 + int(spec.duration_s * 1e9)
    try:
        for i, p in enumerate(payloads):
            sender.point(i, i * slot, len(p))
        attempted = 0  # datagrams, over all subscribers
        clock = time.monotonic_ns
        while events < MAX_EVENTS_PER_ROUND and clock() < end:
            for sock, _address in targets:
                sent += sender.send(sock, 0, CEILING_BATCH)
                attempted += CEILING_BATCH
                for _i, err in sender.errors:
                    name = _failure(err, sock)
                    failures[name] = failures.get(name, 0) + 1
                if clock() >= end:
                    break  # with 1,000 subscribers a pass takes a second: stop on time
            events = attempted // len(targets)  # CEILING_BATCH per complete pass
        t_end = time.monotonic_ns()
    finally:
        for sock, _ in targets:
            sock.close()
        sender.iov_words.release()
        del sender
        with contextlib.suppress(BufferError):
            view.release()
    return {"events": events, "sent": sent, "failures": failures, "t0_ns": t0, "t_end_ns": t_end}


def run_ingest(spec: IngestSpec) -> dict[str, Any]:
    """Emit E_BENCH notifications to the ingest socket for `duration_s`: one encoded
    template, `seq` (10 digits from SEQ_BASE) and `t` (monotonic ns, just before the
    batch is sent) rewritten in place per datagram, sendmmsg in batches."""
    t0 = time.monotonic_ns()
    template = encode_notification(EVENT, bench_params(spec.tag, SEQ_BASE, t0))
    t_digits = b"%d" % t0
    seq_at = template.index(b'"seq":%d,' % SEQ_BASE) + len(b'"seq":')
    t_at = template.index(b'"t":' + t_digits + b"}") + len(b'"t":')
    seq_width, t_width = len(b"%d" % SEQ_BASE), len(t_digits)
    size = len(template)
    data = bytearray(template * INGEST_BATCH)
    view = memoryview(data)
    sender = BatchSender(view, INGEST_BATCH)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    failures: dict[str, int] = {}
    sent = events = 0
    seq = SEQ_BASE
    rate = spec.rate
    clock = time.monotonic_ns
    end = t0 + int(spec.duration_s * 1e9)
    try:
        sock.setblocking(False)
        sock.connect(spec.address)
        for i in range(INGEST_BATCH):
            sender.point(i, i * size, size)
        stop = False
        while not stop and events < MAX_EVENTS_PER_ROUND:
            now = clock()
            if now >= end:
                break
            if rate:
                due = int((now - t0) * rate / 1e9) + 1 - events
                if due <= 0:
                    wait = (t0 + events * 1e9 / rate - now) / 1e9
                    time.sleep(max(wait, PACE_TICK_S))  # never spin: CPUs are shared
                    continue
                count = min(due, INGEST_BATCH)
            else:
                count = INGEST_BATCH
            count = min(count, MAX_EVENTS_PER_ROUND - events)
            t_text = b"%d" % clock()
            if len(t_text) != t_width:  # the clock gained a digit: the size would change
                break
            for i in range(count):
                off = i * size
                view[off + seq_at : off + seq_at + seq_width] = b"%d" % seq
                view[off + t_at : off + t_at + t_width] = t_text
                seq += 1
            sent += sender.send(sock, 0, count)
            for _i, err in sender.errors:
                name = errno.errorcode.get(err, "other").lower()
                failures[name] = failures.get(name, 0) + 1
            events += count
        t_end = time.monotonic_ns()
    finally:
        sock.close()
        sender.iov_words.release()
        del sender
        with contextlib.suppress(BufferError):
            view.release()
    return {"events": events, "sent": sent, "failures": failures, "t0_ns": t0, "t_end_ns": t_end}


@contextlib.contextmanager
def scheduled_idle(idle: bool) -> Iterator[None]:
    """With `idle`: this process runs under SCHED_IDLE for the block (it still sends
    as fast as it can, but on CPU time the engine's processes do not want, so a
    full-speed emitter sharing a core with a worker does not take half of it)."""
    if not idle:
        yield
        return
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def sender_main(conn: Connection, cpus: list[int] | None, lifetime_s: float) -> None:
    """Process entry point (a `bench_common.Child`)."""
    prepare_child(cpus)
    prctl(PR_SET_TIMERSLACK, 1000)
    deadline = time.monotonic() + lifetime_s
    conn.send(("ready",))
    while time.monotonic() < deadline:
        if not conn.poll(0.5):
            continue
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "exit":
            return
        try:
            if msg[0] == "ingest":
                with scheduled_idle(msg[1].sched_idle):
                    result = run_ingest(msg[1])
            else:
                result = run_naive(msg[1]) if msg[0] == "naive" else run_ceiling(msg[1])
        except Exception as exc:  # reported, the parent decides
            result = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(result)


class SenderProcess:
    """The parent's handle on the reference sender process."""

    def __init__(self, cpus: list[int] | None, lifetime_s: float) -> None:
        self.child = Child("engine.bench.baseline:sender_main", (cpus, lifetime_s), "sender")
        self.child.recv(30.0, "not ready")

    @property
    def pid(self) -> int:
        return self.child.pid

    def run(self, kind: str, spec: RunSpec | IngestSpec) -> dict[str, Any]:
        self.child.conn.send((kind, spec))
        result: dict[str, Any] = self.child.recv(spec.duration_s + 30.0, f"no {kind} result")
        if "error" in result:
            raise RuntimeError(f"the {kind} sender failed: {result['error']}")
        return result

    def close(self) -> None:
        self.child.close()
