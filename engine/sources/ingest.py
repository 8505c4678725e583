"""Datagram ingest: the engine as an event_datagram subscriber (SPEC section 8).

An OpenSIPS (or anything that speaks event_datagram) sends each event as one
JSON-RPC notification in one datagram to an ingest socket (`[ingest] listen`:
UDP v4/v6 or UNIX); the engine validates it and raises it with the sender's own
bytes, so subscribers receive exactly what the upstream sent.

One thread of the main process reads every ingest socket, `recvmmsg` batches of
up to BATCH datagrams per system call (the GIL is released while it waits or
reads). Per datagram: the source check (UDP: `[ingest] allow`, loopback by
default; cached per address), then per batch `Relay.forward_batch`:
`wire.check_notification` and the event lookup per datagram, and one
`Engine.raise_encoded_batch` (one lock, one ring publish per worker) for them all.
Each outcome is counted per socket; the kernel's drops at a full socket queue
come with every datagram as SO_RXQ_OVFL and are counted too. Per socket, always:

    datagrams received = rejected (by reason) + events raised

An event raised is then the engine's to account (queued, or dropped for a full
ring or no subscribers). Nothing is logged per datagram.

The thread never dies (guard.Guard): a socket whose reading fails (an OSError,
or anything raised while handling its batch) is counted in its errors
("receive_failed", "internal"; datagrams of that batch not yet accounted for are
rejected "internal"), logged once per change, and rested with back-off while
the other sockets are read on; an error of the loop itself is the guard's.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from engine.address import AddressError, parse_destination, parse_listen
from engine.shm.mmsg import RECVMMSG, IoVec, MMsgHdr, MsgHdr
from engine.sources.guard import Backoff, Guard, LogBudget
from engine.sources.relay import Relay, UnknownEvents
from engine.statistics import SourceStatistics

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.ingest")

BATCH: Final = 64  # datagrams per recvmmsg
BUFFER: Final = 1 << 16  # bytes per datagram buffer: any UDP datagram fits
RCVBUF: Final = 8 << 20  # socket receive buffer asked for (SO_RCVBUFFORCE as root)
SO_RXQ_OVFL: Final = getattr(socket, "SO_RXQ_OVFL", 40)
SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
MSG_TRUNC: Final = int(getattr(socket, "MSG_TRUNC", 0x20))  # an int: enum & costs 4 us
NAME_SIZE: Final = 128  # sockaddr_storage
CONTROL_SIZE: Final = 64
LOOPBACK: Final = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
ERROR_REASONS: Final = ("receive_failed", "internal", "thread_died")


# Word offsets (u32) inside one mmsghdr, for reading results without ctypes
# attribute access per datagram.
_STRIDE_WORDS: Final = ctypes.sizeof(MMsgHdr) // 4
_NAMELEN_WORD: Final = MsgHdr.msg_namelen.offset // 4
_CONTROLLEN_WORD: Final = MsgHdr.msg_controllen.offset // 4
_FLAGS_WORD: Final = MsgHdr.msg_flags.offset // 4
_LEN_WORD: Final = MMsgHdr.msg_len.offset // 4
_CMSG_HEADER: Final = struct.Struct("=Qii")  # cmsg_len, cmsg_level, cmsg_type
_NAME_WORDS: Final = NAME_SIZE // 4  # u32 words per source address


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(items: list[str]) -> tuple[Network, ...]:
    """UDP source networks that may send; [] = loopback only. Raises AddressError."""
    if not items:
        return LOOPBACK
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise AddressError(
                f"ingest.allow {item!r}: expected a network, e.g. 10.0.0.0/8"
            ) from None
    return tuple(nets)


def parse_ingest_socket(text: str) -> tuple[int, tuple[str, int] | str]:
    """`udp:IP:PORT` (port 0 = any free one), `udp:[IPV6]:PORT`, `unix:/PATH` or
    `/PATH` -> (family, address to bind). Raises AddressError naming it."""
    if text.startswith("udp:"):
        address = parse_listen(text[4:], "ingest socket")
        if address is None:
            raise AddressError(f"ingest socket {text!r}: expected udp:HOST:PORT")
        return (socket.AF_INET6 if ":" in address[0] else socket.AF_INET), address
    dest = parse_destination(text, resolve=False)
    if dest.transport != "unix" or not isinstance(dest.sockaddr, str):
        raise AddressError(f"ingest socket {text!r}: expected udp:HOST:PORT or unix:/PATH")
    return socket.AF_UNIX, dest.sockaddr


class IngestSocket:
    """One bound ingest socket, its recvmmsg tables and its counters."""

    def __init__(self, text: str, engine: Engine, unknown_events: UnknownEvents) -> None:
        self.text = text
        self.path: str | None = None
        family, address = parse_ingest_socket(text)
        if isinstance(address, tuple):
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                self.sock.bind(address)
            except OSError:
                self.sock.close()
                raise
            host, port = self.sock.getsockname()[:2]
            self.name = (
                f"udp:[{host}]:{port}" if family == socket.AF_INET6 else f"udp:{host}:{port}"
            )
        else:
            self.path = address
            _remove_stale(self.path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                self.sock.bind(self.path)
                os.chmod(self.path, 0o660)
            except OSError:
                self.sock.close()
                raise
            self.name = f"unix:{self.path}"
        self.sock.setblocking(False)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:  # not root: as much as net.core.rmem_max allows
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.udp = self.path is None
        # recvmmsg tables: BATCH buffers, source addresses and control buffers.
        self._data = ctypes.create_string_buffer(BATCH * BUFFER)
        self._names = ctypes.create_string_buffer(BATCH * NAME_SIZE)
        self._control = ctypes.create_string_buffer(BATCH * CONTROL_SIZE)
        self._iov = (IoVec * BATCH)()
        self._msgs = (MMsgHdr * BATCH)()
        data, names, control = (
            ctypes.addressof(b) for b in (self._data, self._names, self._control)
        )
        for i in range(BATCH):
            self._iov[i].iov_base = data + i * BUFFER
            self._iov[i].iov_len = BUFFER
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = names + i * NAME_SIZE
            hdr.msg_iov = ctypes.addressof(self._iov) + i * ctypes.sizeof(IoVec)
            hdr.msg_iovlen = 1
            hdr.msg_control = control + i * CONTROL_SIZE
        self._words = memoryview(self._msgs).cast("B").cast("I")
        self._data_view = memoryview(self._data).cast("B")
        self._names_view = memoryview(self._names).cast("B")
        self._name_words = self._names_view.cast("I")
        self._control_view = memoryview(self._control).cast("B")
        self._msgs_address = ctypes.addressof(self._msgs)
        # What receive() puts back, with one strided copy per field, in the entries
        # the last recvmmsg filled (the others still hold these).
        self._name_sizes = memoryview(array.array("I", [NAME_SIZE] * BATCH))
        self._control_sizes = memoryview(array.array("I", [CONTROL_SIZE] * BATCH))
        self._used = BATCH  # entries to reset before the next recvmmsg (all, at first)
        self.relay = Relay(engine, "ingest", self.name, unknown_events)
        self.kernel_drops = 0
        self.errors = dict.fromkeys(ERROR_REASONS, 0)  # under relay.lock
        self.backoff = Backoff()
        self.failing: str | None = None  # the last failure, until a read goes well

    def receive(self) -> int:
        """One recvmmsg: up to BATCH datagrams into the tables; returns how many."""
        used = self._used
        if used:  # the kernel shrank these to what it wrote, in the entries it filled
            words = self._words
            end = used * _STRIDE_WORDS
            words[_NAMELEN_WORD:end:_STRIDE_WORDS] = self._name_sizes[:used]
            words[_CONTROLLEN_WORD:end:_STRIDE_WORDS] = self._control_sizes[:used]
        assert RECVMMSG is not None  # Linux has had it since 2.6.33
        n = RECVMMSG(self.sock.fileno(), self._msgs_address, BATCH, socket.MSG_DONTWAIT, None)
        if n < 0:
            self._used = 0
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        self._used = int(n)
        return self._used

    def take(self, n: int, allowed: Callable[[bytes], bool]) -> list[bytes]:
        """The last receive's n datagrams, as bytes, but for those rejected here (a
        UDP source that `allowed` refuses: "source_not_allowed"; truncated:
        "oversize"), which are counted in the relay, received and rejected; noting
        the kernel's drop count (read off the last datagram that carries it).

        This is the ingest's hot path. The usual batch (no datagram truncated, every
        one from the same IPv4 source) is read column by column with strided
        copies, its source checked once and each datagram's bytes copied once;
        anything else goes datagram by datagram (_take_each)."""
        end = n * _STRIDE_WORDS
        words = self._words
        controls = words[_CONTROLLEN_WORD:end:_STRIDE_WORDS].tolist()
        if any(controls):  # the drop count only grows: the batch's last one is enough
            self.note_kernel_drops(max(i for i, c in enumerate(controls) if c))
        if any(words[_FLAGS_WORD:end:_STRIDE_WORDS].tolist()):
            return self._take_each(n, allowed)
        if self.udp:
            families = self._names_view[0 : n * NAME_SIZE : NAME_SIZE].tolist()
            sources = self._name_words[1 : n * _NAME_WORDS : _NAME_WORDS].tolist()  # sin_addr
            source = sources[0]
            if families.count(socket.AF_INET) != n or sources.count(source) != n:
                return self._take_each(n, allowed)
            if not allowed(source.to_bytes(4, "little")):
                self.relay.reject("source_not_allowed", n)
                return []
        data = self._data_view
        lengths = words[_LEN_WORD:end:_STRIDE_WORDS].tolist()
        return [
            data[start : start + length].tobytes()
            for start, length in zip(range(0, n * BUFFER, BUFFER), lengths, strict=True)
        ]

    def _take_each(self, n: int, allowed: Callable[[bytes], bool]) -> list[bytes]:
        """take(), datagram by datagram: several sources, IPv6, truncated datagrams."""
        words = self._words
        data = self._data_view
        names = self._names_view
        name_words = self._name_words
        udp = self.udp
        out: list[bytes] = []
        append = out.append
        refused = truncated = 0
        last_key: int | bytes = -1
        last_ok = True
        for i in range(n):
            base = i * _STRIDE_WORDS
            if udp:
                off = i * NAME_SIZE
                key: int | bytes = (
                    name_words[i * _NAME_WORDS + 1]  # sin_addr, as a u32
                    if names[off] == socket.AF_INET
                    else names[off + 8 : off + 24].tobytes()  # sin6_addr
                )
                if key != last_key:
                    raw = key.to_bytes(4, "little") if isinstance(key, int) else key
                    last_key, last_ok = key, allowed(raw)
                if not last_ok:
                    refused += 1
                    continue
            if words[base + _FLAGS_WORD] & MSG_TRUNC:
                truncated += 1
                continue
            start = i * BUFFER
            append(data[start : start + words[base + _LEN_WORD]].tobytes())
        if refused or truncated:
            self.relay.reject("source_not_allowed", refused)
            self.relay.reject("oversize", truncated)
        return out

    def note_kernel_drops(self, i: int) -> None:
        """Read SO_RXQ_OVFL (the socket's drop count so far) off datagram i, if there."""
        base = i * _STRIDE_WORDS
        controllen = self._words[base + _CONTROLLEN_WORD]
        off = i * CONTROL_SIZE
        view = self._control_view
        pos = 0
        while pos + _CMSG_HEADER.size <= controllen:
            length, level, kind = _CMSG_HEADER.unpack_from(view, off + pos)
            if length < _CMSG_HEADER.size:
                return
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL:
                start = off + pos + _CMSG_HEADER.size
                self.kernel_drops = int.from_bytes(view[start : start + 4], "little")
                return
            pos += (length + 7) & ~7

    def statistics(self) -> SourceStatistics:
        with self.relay.lock:
            errors = dict(self.errors)
        return self.relay.statistics(kernel_drops=self.kernel_drops, errors=errors)

    def close(self) -> None:
        views = (self._words, self._data_view, self._name_words, self._names_view)
        for view in (*views, self._control_view):
            view.release()
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.path)
                if stat.S_ISSOCK(st.st_mode):
                    os.unlink(self.path)


def _remove_stale(path: str) -> None:
    """A socket file left by a crashed run is replaced; a live one (someone
    answers on it) or any other file is an error naming it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody reads it: stale
        return
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running program")


class Ingest:
    """The ingest sockets and the thread that reads them into an Engine."""

    def __init__(
        self,
        engine: Engine,
        listen: list[str],
        *,
        allow: list[str] | None = None,
        unknown_events: UnknownEvents = "reject",
    ) -> None:
        self.allow = parse_allow(allow or [])
        self.sockets: list[IngestSocket] = []
        # (networks, verdict per source address): one attribute, so a reload swaps
        # both at once under the reading thread.
        self._policy: tuple[tuple[Network, ...], dict[bytes, bool]] = (self.allow, {})
        try:
            for text in listen:
                self.sockets.append(IngestSocket(text, engine, unknown_events))
        except BaseException:
            self.close()
            raise
        self._log = LogBudget(log)
        self.guard = Guard(
            "ingest", self._loop, logger=log, count=self._count_thread, budget=self._log
        )
        self._stop = self.guard.stop_event

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sockets]

    def start(self) -> None:
        self.guard.start()

    def stop(self) -> None:
        """Stop reading (what the kernel still holds is not read), close the sockets."""
        self.guard.request_stop()
        self.guard.join(5)
        self.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def statistics(self) -> list[SourceStatistics]:
        return [s.statistics() for s in self.sockets]

    def _loop(self, stop: threading.Event) -> None:
        """The guard's loop: poll every socket, read the ready ones in batches; a
        socket that fails rests (unpolled) for its back-off."""
        poller = select.poll()
        by_fd = {s.sock.fileno(): s for s in self.sockets}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        resting: dict[int, float] = {}  # fd -> when to poll it again
        while not stop.is_set():
            if resting:
                now = time.monotonic()
                for fd in [fd for fd, at in resting.items() if at <= now]:
                    del resting[fd]
                    poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(200):
                sock = by_fd[fd]
                try:
                    while (n := sock.receive()) and not stop.is_set():
                        with sock.relay.lock:
                            self._handle(sock, n)
                        if n < BATCH:
                            break
                except Exception as exc:
                    poller.unregister(fd)
                    resting[fd] = time.monotonic() + self._failed(sock, exc)
                    continue
                if sock.failing is not None:
                    sock.failing = None
                    sock.backoff.reset()
                    self._log.info("ingest %s: reading again", sock.name)

    def _handle(self, sock: IngestSocket, n: int) -> None:
        """One recvmmsg batch (under the relay's lock): the source and size checks,
        then the rest validated and raised as one batch (Relay.forward_batch). If
        that raises, the batch's datagrams not yet accounted for are counted
        rejected "internal", so the identity still holds."""
        relay = sock.relay
        before = relay.received
        try:
            relay.forward_batch(sock.take(n, self._source_allowed))
        except Exception:
            relay.lose(before, n)
            raise

    def _failed(self, sock: IngestSocket, exc: Exception) -> float:
        """Count a socket's failure, log it when it is new; its back-off delay."""
        reason = "receive_failed" if isinstance(exc, OSError) else "internal"
        with sock.relay.lock:
            sock.errors[reason] += 1
        what = f"{type(exc).__name__}: {exc}"[:300]
        delay = sock.backoff.next()
        if what != sock.failing:
            self._log.log(
                logging.ERROR,
                "ingest %s: %s (counted; reading it again in %.1f s, with back-off)",
                sock.name,
                what,
                delay,
                exc_info=exc if reason == "internal" and sock.failing is None else None,
            )
        sock.failing = what
        return delay

    def _count_thread(self, reason: str) -> None:
        """The guard's count: the thread reads every socket, so each counts it."""
        for sock in self.sockets:
            with sock.relay.lock:
                sock.errors[reason] = sock.errors.get(reason, 0) + 1

    def set_policy(self, allow: list[str], unknown_events: UnknownEvents) -> None:
        """A config reload: new source networks and unknown-event rule; the sockets
        stay bound (nothing is missed). Raises ValueError naming a bad network."""
        networks = parse_allow(allow)
        self.allow = networks
        self._policy = (networks, {})
        for sock in self.sockets:
            sock.relay.unknown_events = unknown_events

    def _source_allowed(self, raw: bytes) -> bool:
        networks, verdicts = self._policy
        allowed = verdicts.get(raw)
        if allowed is None:
            try:
                ip = ipaddress.ip_address(raw)
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            allowed = any(ip in net for net in networks)
            if len(verdicts) < 65536:  # bounded: a flood of sources cannot grow it
                verdicts[raw] = allowed
        return allowed
