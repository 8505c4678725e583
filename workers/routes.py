"""Groups and filtered subscribers in a worker: the decision and the failover.

The producer sends a group (engine.targets: OpenSIPS event_virtual's PARALLEL,
FAILOVER, ROUND-ROBIN, and HASH) or a filtered socket as one control record
with a `policy`; every such subscription of an event lives in one worker,
which decides per event here:

- a filter is checked on the event's top-level named params, decoded from the
  payload once per event (and only for events that have such a subscriber);
- PARALLEL sends to every member; FAILOVER to the first member that is up;
  ROUND-ROBIN to the next member in turn; HASH to the member ranked first by
  rendezvous hashing of the param's value (an event without it hashes "");
- a member whose send fails (a refused connected UDP socket, a UNIX peer gone
  or still full after engine.unix_wait_ms) is down for `failover_s`, and what
  it could not take goes at once to the next member that is up in that event's
  order (FAILOVER: the later members; ROUND-ROBIN: the following ones, round;
  HASH: the next in the key's ranking, so only a down member's keys move).
  Only when no member is up is the datagram counted failed.

Counting: a subscription's pairs per event are its fan-out weight (PARALLEL:
its members, otherwise 1): each is sent, failed, or filtered (`pairs_filtered`,
per event too); `failovers` counts datagrams passed on to another member.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from engine.shm.counters import TRANSPORTS, CounterLayout, Region
from engine.shm.ring import ControlPayload
from workers.sender import RECONNECT_ERRNOS, BatchSender, reason_index
from workers.table import Subscriber, SubscriberTable

UNIX: Final = TRANSPORTS.index("unix")
ORDERED: Final = frozenset({"FAILOVER", "ROUND-ROBIN", "HASH"})


class _Params(msgspec.Struct):
    params: dict[str, Any] | list[Any] | None = None


_DECODER: Final = msgspec.json.Decoder(_Params)
_JSON: Final = msgspec.json.Encoder()


def value_text(value: object) -> str | None:
    """A param's value as a filter or a hash sees it: strings as they are, numbers,
    booleans and null as JSON writes them; None for lists and objects (no match)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return _JSON.encode(value).decode()
    return None


@dataclass(eq=False, slots=True)
class Route:
    """One group or filtered socket of one event."""

    key: str
    policy: str  # "SINGLE", "PARALLEL", "FAILOVER", "ROUND-ROBIN", "HASH"
    members: list[Subscriber]
    conditions: list[tuple[str, re.Pattern[str]]]
    hash_param: str
    failover_s: float
    slot: int
    down_until: list[float] = field(default_factory=list)  # per member, monotonic
    salts: list[bytes] = field(default_factory=list)  # per member: its rendezvous key
    next_rr: int = 0

    @property
    def weight(self) -> int:
        return len(self.members) if self.policy == "PARALLEL" else 1

    def matches(self, params: dict[str, Any] | list[Any] | None) -> bool:
        if not self.conditions:
            return True
        if not isinstance(params, dict):
            return False  # positional or no params: no name can match
        for name, pattern in self.conditions:
            if name not in params:
                return False
            text = value_text(params[name])
            if text is None or pattern.match(text) is None:
                return False
        return True

    def ranking(self, params: dict[str, Any] | list[Any] | None) -> list[int]:
        """HASH: members by rendezvous score of the param's value, best first."""
        value = params.get(self.hash_param) if isinstance(params, dict) else None
        text = value_text(value) if value is not None else ""
        data = (text or "").encode("utf-8", "surrogatepass")
        scores = [
            (hashlib.blake2b(data, digest_size=8, key=salt).digest(), k)
            for k, salt in enumerate(self.salts)
        ]
        scores.sort(reverse=True)
        return [k for _, k in scores]


class RouteTable:
    """The worker's groups and filtered sockets, by event then key; owns their sockets."""

    def __init__(self, sndbuf: int = 0) -> None:
        self.by_event: dict[int, dict[str, Route]] = {}
        self.sndbuf = sndbuf
        self.sockets = 0

    def subscribe(self, event_id: int, control: ControlPayload) -> None:
        routes = self.by_event.setdefault(event_id, {})
        if control.key in routes:
            return
        plain = control.members or [
            ControlPayload(control.key, control.transport, control.family, control.sockaddr, -1)
        ]
        members = [self._open(m) for m in plain]
        conditions = [
            (name, re.compile(fnmatch.translate(pattern), re.DOTALL))
            for name, pattern in control.conditions
        ]
        routes[control.key] = Route(
            control.key, control.policy, members, conditions, control.hash_param,
            control.failover_s, control.slot, [0.0] * len(members),
            [hashlib.blake2b(m.key.encode(), digest_size=16).digest() for m in members],
        )  # fmt: skip

    def unsubscribe(self, event_id: int, key: str) -> None:
        routes = self.by_event.get(event_id)
        route = routes.pop(key, None) if routes is not None else None
        if route is None:
            return
        if routes is not None and not routes:
            del self.by_event[event_id]
        for member in route.members:
            member.sock.close()
            self.sockets -= 1

    def _open(self, control: ControlPayload) -> Subscriber:
        sock = socket.socket(control.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        if self.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        self.sockets += 1
        sub = Subscriber(
            control.key, TRANSPORTS.index(control.transport), control.family,
            control.address(), sock, connected=False, shared=False,
        )  # fmt: skip
        sub.slot = control.slot
        SubscriberTable.connect(sub, time.monotonic())
        return sub

    def close(self) -> None:
        for routes in self.by_event.values():
            for route in routes.values():
                for member in route.members:
                    member.sock.close()
        self.by_event.clear()


class RouteSender:
    """Sends one batch's events to the routes that want them (see the module doc)."""

    def __init__(
        self,
        table: RouteTable,
        sender: BatchSender,
        region: Region,
        layout: CounterLayout,
        add: Callable[[int, int], None],
        spare: int,
        unix_wait_s: float,
    ) -> None:
        self.table = table
        self.sender = sender
        self.region = region
        self.layout = layout
        self.add = add
        self.spare = spare  # first iovec entry of the table's second half
        self.unix_wait_s = unix_wait_s
        self.i_sent = layout.scalar("pairs_sent")
        self.i_failed = layout.scalar("pairs_failed")
        self.i_filtered = layout.scalar("pairs_filtered")
        self.i_failovers = layout.scalar("failovers")

    def send(self, n: int, eids: list[int], lengths: list[int], deadline: list[float]) -> int:
        """Entries [0, n) of the batch; returns the pairs handled. `deadline` holds
        the batch's UNIX wait deadline (shared with the plain sends; 0 = not started)."""
        by_event = self.table.by_event
        params: dict[int, Any] = {}  # batch index -> decoded params: once per event
        pairs = 0
        positions: dict[int, list[int]] = {}
        for i in range(n):
            if eids[i] in by_event:
                positions.setdefault(eids[i], []).append(i)
        for eid, idx in positions.items():
            for route in by_event[eid].values():
                pairs += route.weight * len(idx)
                keep = idx
                if route.conditions:
                    keep = [i for i in idx if route.matches(self._params(i, params))]
                    dropped = (len(idx) - len(keep)) * route.weight
                    if dropped:
                        self.add(self.layout.filtered(eid), dropped)
                        self.add(self.i_filtered, dropped)
                if not keep:
                    continue
                if route.policy in ORDERED:
                    self._send_ordered(route, eid, keep, lengths, params, deadline)
                else:
                    for k in range(len(route.members)):
                        self._send_member(route, k, eid, keep, lengths, deadline)
        return pairs

    def _params(self, i: int, cache: dict[int, Any]) -> Any:
        if i in cache:
            return cache[i]
        sender = self.sender
        words = sender.iov_words
        offset = words[2 * i] - sender.data_address
        try:
            value = _DECODER.decode(sender.data[offset : offset + words[2 * i + 1]]).params
        except (msgspec.DecodeError, msgspec.ValidationError):
            value = None  # validated at the door; never fatal here
        cache[i] = value
        return value

    def _send_ordered(
        self,
        route: Route,
        eid: int,
        keep: list[int],
        lengths: list[int],
        params: dict[int, Any],
        deadline: list[float],
    ) -> None:
        """FAILOVER, ROUND-ROBIN, HASH: each event to one member, failing over."""
        m = len(route.members)
        now = time.monotonic()
        down = route.down_until
        orders: dict[int, list[int]] = {}
        for i in keep:
            if route.policy == "HASH":
                orders[i] = route.ranking(self._params(i, params))
            elif route.policy == "ROUND-ROBIN":
                start = route.next_rr
                orders[i] = [(start + j) % m for j in range(m)]
            else:
                orders[i] = list(range(m))
            if route.policy == "ROUND-ROBIN":
                first = next((k for k in orders[i] if down[k] <= now), orders[i][0])
                route.next_rr = (first + 1) % m
        pending: dict[int, list[int]] = {}
        failed: list[int] = []
        for i in keep:
            self._assign(route, i, orders[i], -1, now, pending, failed)
        rounds = 0
        while pending and rounds <= m:  # each round takes a member down: bounded
            rounds += 1
            current, pending = pending, {}
            for k, lst in current.items():
                unsent = self._send_member(route, k, eid, lst, lengths, deadline, stop=True)
                if not unsent:
                    continue
                down[k] = time.monotonic() + route.failover_s
                for i in unsent:
                    if self._assign(route, i, orders[i], k, now, pending, failed):
                        self.add(self.i_failovers, 1)
        if failed:
            err = next((s.last_errno for s in route.members if s.last_errno), errno.EIO)
            transport = route.members[0].transport
            self.add(self.layout.failure(transport, reason_index(err)), len(failed))
            self.add(self.i_failed, len(failed))
            if route.slot >= 0:
                self.region.count_subscriber(route.slot, 0, len(failed))

    @staticmethod
    def _assign(
        route: Route,
        i: int,
        order: list[int],
        after: int,
        now: float,
        pending: dict[int, list[int]],
        failed: list[int],
    ) -> bool:
        """Give entry i to the first member that is up in `order` (after `after`,
        for FAILOVER: only later members); True when one took it."""
        down = route.down_until
        start = order.index(after) + 1 if after >= 0 else 0
        candidates = order[start:] if route.policy == "FAILOVER" else order[start:] + order[:start]
        for k in candidates:
            if k != after and down[k] <= now:
                pending.setdefault(k, []).append(i)
                return True
        failed.append(i)
        return False

    def _send_member(
        self,
        route: Route,
        k: int,
        eid: int,
        idx: list[int],
        lengths: list[int],
        deadline: list[float],
        stop: bool = False,
    ) -> list[int]:
        """Send entries `idx` to member k; count what went out. Returns the entries
        not sent when `stop` (they fail over), else counts them failed."""
        self.region.beat(time.monotonic_ns())
        sub = route.members[k]
        sender = self.sender
        unsent: list[int] = []
        sent = 0
        if not sub.connected and not SubscriberTable.connect(sub, time.monotonic()):
            unsent = list(idx)
            errs = [(0, sub.last_errno)] * len(idx)
        else:
            iov = sender.iov_words
            base = self.spare
            for j, i in enumerate(idx):
                iov[2 * (base + j)] = iov[2 * i]
                iov[2 * (base + j) + 1] = iov[2 * i + 1]
            wait = sub.transport == UNIX and self.unix_wait_s > 0
            if wait and not deadline[0]:
                deadline[0] = time.monotonic() + self.unix_wait_s
            sent = sender.send(sub.sock, base, len(idx), deadline[0] if wait else 0.0, stop)
            errs = list(sender.errors)
            if stop and errs:
                unsent = idx[errs[0][0] - base :]
            else:
                bad = {e - base for e, _ in errs}
                unsent = [i for j, i in enumerate(idx) if j in bad]
            if errs:
                last = errs[-1][1]
                sub.last_errno = last
                if sub.transport == UNIX and last in RECONNECT_ERRNOS:
                    sub.connected = False  # connect again before the next send
        done = set(unsent)
        lay = self.layout
        nbytes = sum(lengths[i] for i in idx if i not in done)
        self.add(lay.sent(eid, sub.transport), sent)
        self.add(lay.sent_bytes(eid, sub.transport), nbytes)
        self.add(self.i_sent, sent)
        if sub.slot >= 0:
            self.region.count_subscriber(sub.slot, sent, len(unsent))
        if route.slot >= 0 and sent:
            self.region.count_subscriber(route.slot, sent, 0)
        if stop or not unsent:
            return unsent
        for _, err in errs[: len(unsent)] if errs else [(0, errno.EIO)] * len(unsent):
            self.add(lay.failure(sub.transport, reason_index(err or errno.EIO)), 1)
        self.add(self.i_failed, len(unsent))
        if route.slot >= 0:
            self.region.count_subscriber(route.slot, 0, len(unsent))
        return unsent
