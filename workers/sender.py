"""Batched, non-blocking datagram sends: `sendmmsg(2)` through ctypes.

One `BatchSender` per worker owns two prebuilt tables: `iovec[BATCH_MAX]`,
whose entries the worker points straight at payloads inside the ring, and
`mmsghdr[BATCH_MAX]`, whose entry i always points at iovec i. Sending the
events i..i+n of a batch to one connected socket is then one system call
that copies nothing in Python. Where `sendmmsg` is missing, `send()` per
datagram does the same job more slowly.

Errors never stop the rest of the batch for the other subscribers, and never
spin: every loop iteration either sends a datagram or gives up on at least one.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import select
import socket
import struct
import time
from typing import Any, Final

from engine.shm.counters import REASONS
from engine.shm.mmsg import SENDMMSG, IoVec, MMsgHdr

MSG_DONTWAIT: Final = int(getattr(socket, "MSG_DONTWAIT", 0x40))  # an int, not an enum flag
UIO_MAXIOV: Final = 1024  # most messages one sendmmsg takes

# Errors after which the rest of this subscriber's batch would fail the same way
# right now: count them all at once instead of one system call each.
_WHOLE_BATCH: Final = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOENT, errno.ENOTCONN})
# UNIX datagram peer gone: the socket must be connected again before it can send.
RECONNECT_ERRNOS: Final = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.EPIPE})

_REASON_OF_ERRNO: Final = {
    errno.EAGAIN: REASONS.index("eagain"),
    errno.ENOBUFS: REASONS.index("enobufs"),
    errno.ECONNREFUSED: REASONS.index("econnrefused"),
    errno.ENOENT: REASONS.index("enoent"),
    errno.EMSGSIZE: REASONS.index("emsgsize"),
}
REASON_OTHER: Final = REASONS.index("other")


def _wait_writable(fd: int, deadline: float) -> bool:
    """Wait until `fd` is writable or `deadline` passes; True when it is writable."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(max(1, math.ceil(remaining * 1000))))


def reason_index(err: int) -> int:
    return _REASON_OF_ERRNO.get(err, REASON_OTHER)


class BatchSender:
    """The iovec/mmsghdr tables of one worker, and the send loop over them.

    `point(i, offset, length)` aims entry i at `data[offset:offset+length]` (the
    ring's data area); `send(sock, start, count)` sends entries [start,
    start+count) on one connected socket.
    """

    def __init__(self, data: memoryview, batch_max: int, use_sendmmsg: bool = True) -> None:
        self.batch_max = batch_max
        self.data = data
        self._anchor = ctypes.c_char.from_buffer(data)  # pins the mapping while we point into it
        self.data_address = ctypes.addressof(self._anchor)
        # Twice batch_max entries: the second half holds compact per-subscriber
        # selections when a batch mixes events that not every subscriber wants.
        entries = 2 * batch_max
        self.iov = (IoVec * entries)()
        self.msgs = (MMsgHdr * entries)()
        iov_base = ctypes.addressof(self.iov)
        for i in range(entries):
            self.msgs[i].msg_hdr.msg_iov = iov_base + i * ctypes.sizeof(IoVec)
            self.msgs[i].msg_hdr.msg_iovlen = 1
        # The iovec table as u64 words: entry i is words 2i (base) and 2i+1 (length).
        self.iov_words = memoryview(self.iov).cast("B").cast("Q")
        self.msgs_address = ctypes.addressof(self.msgs)
        self.sendmmsg = SENDMMSG if use_sendmmsg else None
        self.errors: list[tuple[int, int]] = []  # (entry index, errno) of the last send
        self.sent_after_wait = 0  # of the last send: datagrams that went out after a wait

    def point(self, index: int, offset: int, length: int) -> None:
        words = self.iov_words
        words[2 * index] = self.data_address + offset
        words[2 * index + 1] = length

    def send(
        self,
        sock: socket.socket,
        start: int,
        count: int,
        wait_until: float = 0.0,
        stop_on_error: bool = False,
    ) -> int:
        """Send entries [start, start+count) on `sock`; return how many went out.

        Failures land in `self.errors` as (entry, errno); whole-batch errors
        (EAGAIN, ENOBUFS, ENOENT, ENOTCONN) mark every remaining entry at once.
        With `wait_until` (a time.monotonic() deadline), EAGAIN first waits for the
        socket to become writable (the receiver's queue to drain) until then;
        `self.sent_after_wait` tells how much went out after such waits.
        With `stop_on_error` (a group member: what it cannot take goes to another
        member) the first error ends the send: entries from it on are not sent,
        and `self.errors` holds that one entry.
        """
        errors = self.errors
        errors.clear()
        self.sent_after_wait = 0
        end = start + count
        fn = self.sendmmsg
        # One datagram (the first event after a pause): socket.send, a built-in,
        # whose call path after a pause is shorter than ctypes' (~15 us less latency
        # on the development machine, docs/benchmark.md); the kernel work is the same.
        if fn is None or (count == 1 and not wait_until):
            return self._send_each(sock, start, end, stop_on_error)
        fd = sock.fileno()
        sent = 0
        waited = False
        size = ctypes.sizeof(MMsgHdr)
        while start < end:
            n = fn(fd, self.msgs_address + start * size, end - start, MSG_DONTWAIT)
            if n > 0:
                sent += n
                start += n
                if waited:
                    self.sent_after_wait += n
                if stop_on_error and start < end and sock.family != socket.AF_UNIX:
                    # A short sendmmsg on UDP hides its error (the kernel reports an
                    # ICMP-set error once, and sendmmsg drops it after a partial send):
                    # sending on would reach a receiver known dead. Stop here.
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    errors.append((start, err or errno.ECONNREFUSED))
                    break
                continue
            err = ctypes.get_errno() if n < 0 else errno.EIO
            if err == errno.EINTR:
                continue  # nothing was sent; retry (bounded: a signal per retry)
            if err == errno.EAGAIN and wait_until and _wait_writable(fd, wait_until):
                waited = True
                continue  # bounded: the deadline ends the waiting
            if stop_on_error:
                errors.append((start, err))
                break
            if err in _WHOLE_BATCH:
                errors.extend((i, err) for i in range(start, end))
                break
            errors.append((start, err))
            start += 1
        return sent

    def _send_each(self, sock: socket.socket, start: int, end: int, stop: bool = False) -> int:
        """The portable path: one send() per datagram, same error rules."""
        sent = 0
        words = self.iov_words
        base = self.data_address
        data = self.data
        i = start
        while i < end:
            offset = words[2 * i] - base
            try:
                sock.send(data[offset : offset + words[2 * i + 1]], MSG_DONTWAIT)
                sent += 1
            except InterruptedError:
                continue
            except OSError as exc:
                err = exc.errno or errno.EIO
                if stop:
                    self.errors.append((i, err))
                    break
                if err in _WHOLE_BATCH:
                    self.errors.extend((j, err) for j in range(i, end))
                    break
                self.errors.append((i, err))
            i += 1
        return sent


def sockaddr_bytes(family: int, address: str | tuple[str | int, ...]) -> bytes:
    """The C `struct sockaddr_*` for `address` (as socket.connect() takes it)."""
    if family == socket.AF_INET:
        host, port = str(address[0]), int(address[1])
        return struct.pack("=HH4s8x", family, socket.htons(port), socket.inet_pton(family, host))
    if family == socket.AF_INET6:
        host, port = str(address[0]), int(address[1])
        flowinfo = int(address[2]) if len(address) > 2 else 0
        scope = int(address[3]) if len(address) > 3 else 0
        packed = socket.inet_pton(family, host)
        return struct.pack("=HHI16sI", family, socket.htons(port), flowinfo, packed, scope)
    path = os.fsencode(address if isinstance(address, str) else str(address[0]))
    return struct.pack("=H", family) + path + b"\0"


class SharedGroup:
    """Subscribers of one event that share one unconnected socket (one family).

    One event goes to all of them in one `sendmmsg`: every entry of the group's
    mmsghdr table names one subscriber (msg_name) and points at the same iovec,
    which is aimed at the event's payload before each call. So a subscriber
    beyond the connected-socket limit costs no system call of its own.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.members: dict[str, Any] = {}  # table.Subscriber by key (O(1) add, remove)
        self.order: list[Any] = []  # the members as the table was built: errors index it
        self._iov = IoVec()
        self._names: ctypes.Array[ctypes.c_char] | None = None
        self._msgs: ctypes.Array[MMsgHdr] | None = None
        self.errors: list[tuple[int, int]] = []  # (member index, errno) of the last send

    def add(self, sub: Any) -> None:
        self.members[sub.key] = sub
        self._msgs = None  # rebuilt at the next send

    def remove(self, sub: Any) -> None:
        del self.members[sub.key]
        self._msgs = None

    def _build(self) -> ctypes.Array[MMsgHdr]:
        self.order = list(self.members.values())
        names = [sockaddr_bytes(m.family, m.sockaddr) for m in self.order]
        stride = max((len(n) for n in names), default=1)
        self._names = buf = ctypes.create_string_buffer(stride * max(1, len(names)))
        base = ctypes.addressof(buf)
        msgs = (MMsgHdr * max(1, len(names)))()
        iov = ctypes.addressof(self._iov)
        for i, name in enumerate(names):
            ctypes.memmove(base + i * stride, name, len(name))
            hdr = msgs[i].msg_hdr
            hdr.msg_name = base + i * stride
            hdr.msg_namelen = len(name)
            hdr.msg_iov = iov
            hdr.msg_iovlen = 1
        self._msgs = msgs
        return msgs

    def send(self, address: int, length: int) -> int:
        """Send the payload at `address` (`length` bytes) to every member; return how
        many went out. Failures land in `self.errors` as (member index, errno)."""
        errors = self.errors
        errors.clear()
        msgs = self._msgs if self._msgs is not None else self._build()
        count = len(self.order)
        fn = SENDMMSG
        self._iov.iov_base = address
        self._iov.iov_len = length
        if fn is None:
            return self._send_each(address, length)
        fd = self.sock.fileno()
        size = ctypes.sizeof(MMsgHdr)
        first = ctypes.addressof(msgs)
        start = sent = 0
        while start < count:
            n = fn(fd, first + start * size, min(count - start, UIO_MAXIOV), MSG_DONTWAIT)
            if n > 0:
                sent += n
                start += n
                continue
            err = ctypes.get_errno() if n < 0 else errno.EIO
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.ENOBUFS):  # the shared socket's buffer is full
                errors.extend((i, err) for i in range(start, count))
                break
            errors.append((start, err))  # this member's address; go on with the next
            start += 1
        return sent

    def _send_each(self, address: int, length: int) -> int:
        payload = ctypes.string_at(address, length)
        sent = 0
        for i, member in enumerate(self.order):
            try:
                self.sock.sendto(payload, MSG_DONTWAIT, member.sockaddr)
                sent += 1
            except OSError as exc:
                self.errors.append((i, exc.errno or errno.EIO))
        return sent
