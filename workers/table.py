"""A worker's own subscriber table: one socket per subscriber, the events it wants.

The worker applies control records (`engine.ring.ControlPayload`) in ring order,
so a subscribe takes effect exactly before the next event record.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Final

from engine.shm.counters import TRANSPORTS
from engine.shm.ring import ControlPayload
from workers.sender import SharedGroup

log = logging.getLogger("event_datagram.worker")

RECONNECT_INTERVAL_S: Final = 0.05
FD_RESERVE: Final = 64  # descriptors kept free for the worker's own needs


@dataclass(eq=False, slots=True)
class Subscriber:
    key: str
    transport: int  # index into TRANSPORTS
    family: int
    sockaddr: str | tuple[str | int, ...]
    sock: socket.socket
    connected: bool  # False: shared socket (sendto) or a connect still pending
    shared: bool  # True: uses the worker's shared unconnected socket for its family
    events: set[int] = field(default_factory=set)
    retry_at: float = 0.0
    last_errno: int = 0
    stalled: bool = False  # a UNIX receiver that did not drain while we waited
    slot: int = -1  # per-subscriber counter slot (counters.SUBSCRIBER_SLOTS); -1 = none


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class SubscriberTable:
    """Subscribers by key and by event id; owns their sockets.

    Up to `socket_limit` subscribers get a connected socket of their own (one
    `sendmmsg` per batch each). The rest share the worker's unconnected socket
    of their family, grouped per event (`shared_by_event`): one `sendmmsg` per
    event sends it to the whole group, each message naming its destination. A
    connected UDP socket holds an ephemeral port, so the limit keeps the host's
    port range for everyone else.
    """

    def __init__(self, socket_limit: int, sndbuf: int = 0) -> None:
        self.by_key: dict[str, Subscriber] = {}
        # Own-socket subscribers only, by event then key (dicts: O(1) add and remove).
        self.by_event: dict[int, dict[str, Subscriber]] = {}
        self.shared_by_event: dict[int, dict[int, SharedGroup]] = {}  # event -> family -> group
        self.shared_count = 0  # subscribers on shared sockets
        self.socket_limit = socket_limit
        self.sndbuf = sndbuf
        self.own_sockets = 0
        # The shared sockets exist from the start, so running out of descriptors
        # later can never leave a subscriber without any socket.
        self.shared: dict[int, socket.socket] = {}
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            with contextlib.suppress(OSError):  # e.g. no IPv6 on this host
                self._shared(family)

    def subscribe(self, event_id: int, control: ControlPayload) -> None:
        sub = self.by_key.get(control.key)
        if sub is None:
            sub = self._open(control)
            self.by_key[control.key] = sub
        if event_id not in sub.events:
            sub.events.add(event_id)
            if sub.shared:
                groups = self.shared_by_event.setdefault(event_id, {})
                group = groups.get(sub.family)
                if group is None:
                    group = groups[sub.family] = SharedGroup(sub.sock)
                group.add(sub)
            else:
                self.by_event.setdefault(event_id, {})[sub.key] = sub

    def unsubscribe(self, event_id: int, key: str) -> None:
        sub = self.by_key.get(key)
        if sub is None or event_id not in sub.events:
            return
        sub.events.discard(event_id)
        if sub.shared:
            groups = self.shared_by_event[event_id]
            group = groups[sub.family]
            group.remove(sub)
            if not group.members:
                del groups[sub.family]
                if not groups:
                    del self.shared_by_event[event_id]
        else:
            subs = self.by_event[event_id]
            del subs[sub.key]
            if not subs:
                del self.by_event[event_id]
        if not sub.events:
            del self.by_key[key]
            if sub.shared:
                self.shared_count -= 1
            else:
                sub.sock.close()
                self.own_sockets -= 1

    def _open(self, control: ControlPayload) -> Subscriber:
        transport = TRANSPORTS.index(control.transport)
        sockaddr = control.address()
        sock = None
        if self.own_sockets < self.socket_limit:
            try:
                sock = socket.socket(control.family, socket.SOCK_DGRAM)
            except OSError as exc:  # out of descriptors or buffers: share instead
                log.warning("subscriber %s: no socket of its own (%s)", control.key, exc)
        if sock is None:
            sub = Subscriber(
                control.key, transport, control.family, sockaddr, self._shared(control.family),
                connected=False, shared=True,
            )  # fmt: skip
            self.shared_count += 1
        else:
            sock.setblocking(False)
            if self.sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            self.own_sockets += 1
            sub = Subscriber(
                control.key, transport, control.family, sockaddr, sock,
                connected=False, shared=False,
            )  # fmt: skip
            self.connect(sub, time.monotonic())
        sub.slot = control.slot
        return sub

    def _shared(self, family: int) -> socket.socket:
        """The worker's one unconnected socket for `family` (sendto per datagram)."""
        sock = self.shared.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self.shared[family] = sock
        return sock

    @staticmethod
    def connect(sub: Subscriber, now: float) -> bool:
        """(Re)connect a subscriber's own socket; on failure retry no sooner than later."""
        try:
            sub.sock.connect(sub.sockaddr)
        except OSError as exc:
            sub.connected = False
            sub.last_errno = exc.errno or 0
            sub.retry_at = now + RECONNECT_INTERVAL_S
            return False
        sub.connected = True
        return True

    def close(self) -> None:
        for sub in self.by_key.values():
            if not sub.shared:
                sub.sock.close()
        for sock in self.shared.values():
            sock.close()
        self.by_key.clear()
        self.by_event.clear()
        self.shared_by_event.clear()
