"""The bench's receivers: real processes that count and check every datagram.

Why this is long: the receiving loop, the per-datagram checks and the parent's
side of the pipe protocol change together, and are read together.

Each receiver process binds some of the subscriber sockets (UDP on 127.0.0.1,
UDP on ::1, UNIX datagram in the bench's temporary directory), asks for a big
receive buffer (SO_RCVBUFFORCE when allowed, else SO_RCVBUF, which the kernel
caps at net.core.rmem_max), and reads them with `recvmmsg(2)` through ctypes,
VLEN datagrams per call, woken by epoll. Every datagram is decoded with msgspec
into the full E_BENCH shape (`bench_common.BenchPayload`) and its method and tag
compared, so a truncated or corrupted datagram counts as invalid, never as
received. Per socket a byte per sequence number finds duplicates; in the latency
phases the receive time minus the raise time of every datagram is kept (in the
idle phase with its sequence number, so the bench can tell which events found a
worker asleep). In the idle phase each datagram is read with `socket.recv_into`
and stamped as it returns, like wake.c's receiver, and checked only after every
ready socket was read (`_drain_each`, `_check_held`).

One process may hold any number of sockets (the bench's default is one process
for all of them, 1,000 included): epoll says which sockets have datagrams, and
each is read until it is empty or has had MAX_CALLS calls. A receiver that falls
behind loses datagrams in the kernel (its sockets' buffers overflow): that is
loss, counted as such, never an error of the bench. What the kernel dropped at
each UDP socket (its `drops` column in /proc/net/udp and udp6, found by the
socket's inode) is read at "begin" and at "report" and reported per socket as
`kernel_drops`, so the bench tells receiver overflow from engine loss. A full
UNIX datagram socket drops nothing: it refuses the sender (EAGAIN), which the
sender counts.

The parent drives them through a pipe, one command at a time:
  ("begin", RoundSpec)  start counting a round (datagrams raised before t0 are stale);
                        replies ("begun",) once its sockets' drop counts are read
  ("report",)           drain the sockets, reply with the round's counts (+ latencies,
                        + their sequence numbers in the idle phase)
  ("exit",)             close and unlink the sockets, leave
A received-datagram total per socket is also published in a small shared file,
for the live progress line. Every loop is bounded: epoll waits 0.2 s at most,
a wake-up reads at most MAX_CALLS recvmmsg per socket, and a receiver leaves on
its own when the pipe closes or its lifetime is over.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import mmap
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

import msgspec

from engine.bench.common import BenchPayload, Child, prepare_child, read_sysctl
from engine.bench.receiver_sockets import open_socket, udp_drops
from engine.shm.mmsg import IoVec, MMsgHdr, MsgHdr

MSG_DONTWAIT: Final = int(
    getattr(socket, "MSG_DONTWAIT", 0x40)
)  # ints: an enum flag's &, | are slow
MSG_TRUNC: Final = int(getattr(socket, "MSG_TRUNC", 0x20))
MAX_CALLS: Final = 32  # recvmmsg calls per socket per wake-up
BUFFER_BUDGET: Final = 8 << 20  # bytes of receive slots per process
LATENCY_CAP: Final = 4_000_000  # latency samples kept per process per round
SEEN_INITIAL: Final = 4096  # bytes of a socket's duplicate map at the start of a round
KINDS: Final = ("udp", "udp6", "unix")
LATENCY_MODES: Final = ("latency", "idle")

_STRIDE: Final = ctypes.sizeof(MMsgHdr) // 4
_LEN_WORD: Final = MMsgHdr.msg_len.offset // 4  # type: ignore[attr-defined]
_FLAGS_WORD: Final = (MMsgHdr.msg_hdr.offset + MsgHdr.msg_flags.offset) // 4  # type: ignore[attr-defined]


def _load_recvmmsg() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.recvmmsg
    fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


class RoundSpec(msgspec.Struct, frozen=True):
    mode: str  # "seq": count + duplicates; "latency": also keep latencies; "idle": also
    # their sequence numbers; "count": no seq
    t0_ns: int  # datagrams raised before this are stale (from an earlier round)
    tag: str
    method: str
    seq_base: int


@dataclass(slots=True)
class _Socket:
    index: int  # subscriber index (global)
    kind: str
    sock: socket.socket
    text: str  # the subscriber socket string
    path: str | None
    seen: bytearray = field(default_factory=bytearray)
    received: int = 0
    unique: int = 0
    duplicates: int = 0
    invalid: int = 0
    truncated: int = 0
    stale: int = 0
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    inode: int = 0  # UDP: the socket's inode, its key in /proc/net/udp{,6}; 0 for UNIX
    drops_at_begin: int = 0

    def reset(self) -> None:
        self.seen = bytearray(SEEN_INITIAL)  # grows with the sequence numbers seen
        self.received = self.unique = self.duplicates = self.invalid = 0
        self.truncated = self.stale = self.bytes = self.first_ns = self.last_ns = 0


class _Receiver:
    def __init__(
        self,
        conn: Connection,
        slots: list[tuple[int, str]],
        socket_dir: str,
        rcvbuf: int,
        slot_bytes: int,
        counters_path: str,
        lifetime_s: float,
    ) -> None:
        self.conn = conn
        self.deadline = time.monotonic() + lifetime_s
        self.sockets: list[_Socket] = []
        self.buffers: list[dict[str, Any]] = []
        for index, kind in slots:
            sock, text, method, effective = open_socket(kind, index, socket_dir, rcvbuf)
            path = sock.getsockname() if kind == "unix" else None
            inode = 0 if kind == "unix" else os.fstat(sock.fileno()).st_ino
            self.sockets.append(_Socket(index, kind, sock, text, path, inode=inode))
            self.buffers.append({"index": index, "method": method, "effective": effective})
        self.by_fd = {s.sock.fileno(): s for s in self.sockets}
        # Receive slots: VLEN buffers of slot_bytes, one iovec and one mmsghdr each.
        self.slot = slot_bytes
        self.vlen = max(8, min(256, BUFFER_BUDGET // slot_bytes))
        self.buf = (ctypes.c_char * (self.vlen * slot_bytes))()
        self.view = memoryview(self.buf).cast("B")
        self.iov = (IoVec * self.vlen)()
        self.msgs = (MMsgHdr * self.vlen)()
        base = ctypes.addressof(self.buf)
        for i in range(self.vlen):
            self.iov[i].iov_base = base + i * slot_bytes
            self.iov[i].iov_len = slot_bytes
            self.msgs[i].msg_hdr.msg_iov = ctypes.addressof(self.iov[i])
            self.msgs[i].msg_hdr.msg_iovlen = 1
        self.words = memoryview(self.msgs).cast("B").cast("I")
        self.msgs_address = ctypes.addressof(self.msgs)
        self.recvmmsg = _load_recvmmsg()
        self.decode = msgspec.json.Decoder(BenchPayload).decode
        # Shared received totals (u64 per subscriber, indexed globally) for the progress line.
        fd = os.open(counters_path, os.O_RDWR)
        try:
            self.counters_map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.counters = memoryview(self.counters_map).cast("Q")
        self.spec = RoundSpec("count", 0, "", "", 0)
        self.latencies = array.array("q")
        self.latency_seqs = array.array("q")
        self.errors: dict[str, int] = {}
        # The idle phase's datagrams read but not yet checked: (socket, bytes, size, ns).
        self.held: list[tuple[_Socket, bytes, int, int]] = []
        for s in self.sockets:
            s.reset()

    # -- the loop ----------------------------------------------------------------------------
    def serve(self) -> None:
        ep = select.epoll()
        ctl = self.conn.fileno()
        try:
            ep.register(ctl, select.EPOLLIN)
            for fd in self.by_fd:
                ep.register(fd, select.EPOLLIN)
            self.conn.send(("ready", [s.text for s in self.sockets], self.buffers, self.vlen))
            while time.monotonic() < self.deadline:
                for fd, _ev in ep.poll(0.2):
                    if fd == ctl:
                        if not self._command():
                            return
                    else:
                        self._drain(self.by_fd[fd], MAX_CALLS)
                if self.held:
                    self._check_held()
        finally:
            ep.close()
            self.close()

    def _command(self) -> bool:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            return False
        if msg[0] == "begin":
            self.spec = msg[1]
            self.latencies = array.array("q")
            self.latency_seqs = array.array("q")
            self.errors = {}
            drops = udp_drops({s.inode for s in self.sockets if s.inode})
            for s in self.sockets:
                s.reset()
                s.drops_at_begin = drops.get(s.inode, 0)
            self.conn.send(("begun",))  # the drop counts are read: the round may start
        elif msg[0] == "report":
            for s in self.sockets:  # what is already queued belongs to this round
                self._drain(s, 1 << 16)
            self._check_held()
            self.conn.send(self._report())
            if self.spec.mode in LATENCY_MODES:
                self.conn.send_bytes(self.latencies.tobytes())
            if self.spec.mode == "idle":
                self.conn.send_bytes(self.latency_seqs.tobytes())
        elif msg[0] == "exit":
            return False
        return True

    def _drain(self, s: _Socket, max_calls: int) -> None:
        if self.spec.mode == "idle":
            self._drain_each(s, max_calls)
            return
        fd = s.sock.fileno()
        vlen = self.vlen
        recvmmsg = self.recvmmsg
        address = self.msgs_address
        for _ in range(max_calls):
            n = recvmmsg(fd, address, vlen, MSG_DONTWAIT, None)
            if n <= 0:
                err = ctypes.get_errno()
                if n < 0 and err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    name = errno.errorcode.get(err, str(err))
                    self.errors[name] = self.errors.get(name, 0) + 1
                return
            self._consume(s, n, time.monotonic_ns())
            self.counters[s.index] += n
            if n < vlen:
                return

    def _drain_each(self, s: _Socket, max_calls: int) -> None:
        """The idle phase's reads: one `socket.recv_into` per datagram, its receive time
        taken as it returns, as wake.c's receiver does with recv(2) (a built-in: after
        a pause, ctypes' recvmmsg path is tens of microseconds longer). The datagrams
        are only copied aside here and checked by `_check_held()` once every ready
        socket has been read, so checking one event's first datagram does not delay
        the receive time of its others."""
        sock = s.sock
        slot = self.slot
        first = self.view[:slot]
        try:
            for _ in range(max_calls):
                try:
                    size = sock.recv_into(first, slot, MSG_DONTWAIT | MSG_TRUNC)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    self.errors[name] = self.errors.get(name, 0) + 1
                    return
                self.held.append((s, bytes(first[: min(size, slot)]), size, time.monotonic_ns()))
        finally:
            first.release()

    def _check_held(self) -> None:
        """Check the datagrams `_drain_each` set aside, each with its receive time: put
        back where recvmmsg's first would land, so `_consume` reads it the same way."""
        words = self.words
        view = self.view
        slot = self.slot
        for s, data, size, now in self.held:
            view[: len(data)] = data
            words[_LEN_WORD] = len(data)
            words[_FLAGS_WORD] = MSG_TRUNC if size > slot else 0
            self._consume(s, 1, now)
            self.counters[s.index] += 1
        self.held.clear()

    def _consume(self, s: _Socket, n: int, now: int) -> None:
        """Check n datagrams just received on s; `now` is their receive time."""
        spec = self.spec
        words = self.words
        view = self.view
        slot = self.slot
        decode = self.decode
        tag = spec.tag
        method = spec.method
        t0 = spec.t0_ns
        base = spec.seq_base
        mode = spec.mode
        track = mode != "count"
        keep = mode in LATENCY_MODES and len(self.latencies) < LATENCY_CAP
        lat = self.latencies if keep else None
        seqs = self.latency_seqs if keep and mode == "idle" else None
        seen = s.seen
        ok = dup = invalid = trunc = stale = nbytes = 0
        for i in range(n):
            length = words[i * _STRIDE + _LEN_WORD]
            if words[i * _STRIDE + _FLAGS_WORD] & MSG_TRUNC:
                trunc += 1
                continue
            off = i * slot
            try:
                p = decode(view[off : off + length])
            except msgspec.DecodeError:  # ValidationError included
                invalid += 1
                continue
            params = p.params
            if p.method != method or params.tag != tag:
                invalid += 1
                continue
            t = params.t
            if t < t0:
                stale += 1
                continue
            ok += 1
            nbytes += length
            if track:
                seq = params.seq - base
                if seq >= len(seen):
                    if seq >= 1 << 26:
                        invalid += 1
                        ok -= 1
                        continue
                    seen.extend(bytes(max(seq + 1, 2 * len(seen)) - len(seen)))
                if seq < 0:
                    invalid += 1
                    ok -= 1
                elif seen[seq]:
                    dup += 1
                else:
                    seen[seq] = 1
                if lat is not None:
                    lat.append(now - t)
                    if seqs is not None:
                        seqs.append(seq)
        if ok:
            if not s.first_ns:
                s.first_ns = now
            s.last_ns = now
        s.received += ok
        s.duplicates += dup
        s.unique += ok - dup if track else ok
        s.invalid += invalid
        s.truncated += trunc
        s.stale += stale
        s.bytes += nbytes

    def _report(self) -> dict[str, Any]:
        drops = udp_drops({s.inode for s in self.sockets if s.inode})
        return {
            "pid": os.getpid(),
            "sockets": [
                {
                    "index": s.index,
                    "socket": s.text,
                    "received": s.received,
                    "unique": s.unique,
                    "duplicates": s.duplicates,
                    "invalid": s.invalid,
                    "truncated": s.truncated,
                    "stale": s.stale,
                    "bytes": s.bytes,
                    "first_ns": s.first_ns,
                    "last_ns": s.last_ns,
                    "kernel_drops": drops.get(s.inode, s.drops_at_begin) - s.drops_at_begin,
                }
                for s in self.sockets
            ],
            "errors": dict(self.errors),
            "latency_samples": len(self.latencies),
        }

    def close(self) -> None:
        for s in self.sockets:
            s.sock.close()
            if s.path:
                with contextlib.suppress(OSError):
                    os.unlink(s.path)
        self.counters.release()
        self.counters_map.close()


def receiver_main(
    conn: Connection,
    slots: list[tuple[int, str]],
    socket_dir: str,
    rcvbuf: int,
    slot_bytes: int,
    counters_path: str,
    cpus: list[int] | None,
    lifetime_s: float,
) -> None:
    """Process entry point (a `bench_common.Child`)."""
    prepare_child(cpus)
    try:
        receiver = _Receiver(conn, slots, socket_dir, rcvbuf, slot_bytes, counters_path, lifetime_s)
    except Exception as exc:  # tell the parent why, instead of leaving it waiting
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    receiver.serve()


# -- the parent's side ------------------------------------------------------------------------
@dataclass
class RoundReport:
    """What every receiver saw in one round, merged."""

    sockets: list[dict[str, Any]]  # per subscriber, in subscriber order
    latencies_ns: array.array[int]
    errors: dict[str, int]
    latency_seqs: array.array[int] = field(default_factory=lambda: array.array("q"))
    """Idle phase: the sequence number (minus the base) of each latency sample."""

    def total(self, key: str) -> int:
        return sum(int(s.get(key, 0)) for s in self.sockets)

    @property
    def first_ns(self) -> int:
        firsts = [s["first_ns"] for s in self.sockets if s["first_ns"]]
        return min(firsts) if firsts else 0

    @property
    def last_ns(self) -> int:
        return max((s["last_ns"] for s in self.sockets), default=0)


class ReceiverPool:
    """The receiver processes of one bench run (started once, reused every round)."""

    def __init__(
        self,
        kinds: list[str],
        processes: int,
        socket_dir: str,
        rcvbuf: int,
        slot_bytes: int,
        cpus: list[int] | None,
        lifetime_s: float,
    ) -> None:
        self.kinds = kinds
        self.counters_path = os.path.join(socket_dir, "received.u64")
        size = 8 * max(1, len(kinds))
        with open(self.counters_path, "wb") as f:
            f.write(bytes(size))
        fd = os.open(self.counters_path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._counters = memoryview(self._map).cast("Q")
        self.children: list[Child] = []
        self.sockets: list[str] = [""] * len(kinds)
        self.buffers: list[dict[str, Any]] = []
        self.vlen = 0
        self.mode = "count"
        self._base = 0
        processes = max(1, min(processes, len(kinds)))
        for p in range(processes):
            slots = [(i, kinds[i]) for i in range(p, len(kinds), processes)]
            args = (slots, socket_dir, rcvbuf, slot_bytes, self.counters_path, cpus, lifetime_s)
            self.children.append(
                Child("engine.bench.receivers:receiver_main", args, f"receiver {p}")
            )
        for p, child in enumerate(self.children):
            msg = child.recv(30.0, "not ready")
            if msg[0] != "ready":
                raise RuntimeError(f"receiver {p} failed: {msg[1]}")
            indexes = range(p, len(kinds), processes)
            for i, text in zip(indexes, msg[1], strict=True):
                self.sockets[i] = text
            self.buffers.extend(msg[2])
            self.vlen = msg[3]
        self.buffers.sort(key=lambda b: int(b["index"]))

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def received_total(self) -> int:
        return sum(self._counters.tolist())

    def begin(self, spec: RoundSpec) -> None:
        self.mode = spec.mode
        self._base = self.received_total()
        for child in self.children:
            child.conn.send(("begin", spec))
        for child in self.children:  # their kernel drop counts are read before any send
            child.recv(30.0, "no begin")

    def settle(self, expected: int, timeout_s: float = 5.0, quiet_s: float = 0.25) -> None:
        """Wait until `expected` datagrams arrived since `begin`, or nothing new arrives
        for `quiet_s` (bounded by `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        last = -1
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            total = self.received_total() - self._base
            if total >= expected:
                return
            if total != last:
                last = total
                last_change = time.monotonic()
            elif time.monotonic() - last_change >= quiet_s:
                return
            time.sleep(0.01)

    def report(self) -> RoundReport:
        for child in self.children:
            child.conn.send(("report",))
        sockets: list[dict[str, Any]] = [{} for _ in self.kinds]
        latencies = array.array("q")
        seqs = array.array("q")
        errors: dict[str, int] = {}
        for child in self.children:
            rep = child.recv(30.0, "no report")
            for s in rep["sockets"]:
                sockets[s["index"]] = s
            for k, v in rep["errors"].items():
                errors[k] = errors.get(k, 0) + v
            targets = [latencies] if self.mode in LATENCY_MODES else []
            if self.mode == "idle":
                targets.append(seqs)
            for target in targets:
                if not child.conn.poll(30.0):
                    raise RuntimeError(f"{child.name}: no latencies within 30 s")
                target.frombytes(child.conn.recv_bytes())
        return RoundReport(sockets, latencies, errors, seqs)

    def close(self) -> None:
        for child in self.children:
            child.close()
        with contextlib.suppress(BufferError, ValueError):
            self._counters.release()
            self._map.close()


def unix_qlen_limit() -> int | None:
    return read_sysctl("net.unix.max_dgram_qlen")
