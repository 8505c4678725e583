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
import logging
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

log = logging.getLogger("event_datagram.worker")

UNIX: Final = TRANSPORTS.index("unix")
ORDERED: Final = frozenset({"FAILOVER", "ROUND-ROBIN", "HASH"})
SCORE_CACHE: Final = 4096  # HASH: param values whose member scores are kept


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
    group: int  # counters.GROUP_SLOTS slot; -1 = none
    down_until: list[float] = field(default_factory=list)  # per member, monotonic
    salts: list[bytes] = field(default_factory=list)  # per member: its rendezvous key
    next_rr: int = 0
    filter_key: tuple[tuple[str, str], ...] = ()  # routes with the same filter share results
    scores: dict[str, list[bytes]] = field(default_factory=dict)  # HASH: value -> per member

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

    def hash_scores(self, params: dict[str, Any] | list[Any] | None) -> list[bytes]:
        """HASH: each member's rendezvous score for the param's value (an event
        without it, or with a list or object there, scores the empty string)."""
        value = params.get(self.hash_param) if isinstance(params, dict) else None
        text = (value_text(value) if value is not None else "") or ""
        scores = self.scores.get(text)
        if scores is None:
            if len(self.scores) >= SCORE_CACHE:
                self.scores.clear()  # bounded; the next keys fill it again
            data = text.encode("utf-8", "surrogatepass")
            scores = self.scores[text] = [
                hashlib.blake2b(data, digest_size=8, key=salt).digest() for salt in self.salts
            ]
        return scores

    def choose(self, i_start: int, scores: list[bytes] | None, skip: int, now: float) -> int:
        """The member an event goes to: the first one up in its order (after its
        `skip` first members); -1 if none.

        FAILOVER: members in list order; ROUND-ROBIN: from the event's turn
        `i_start`, round; HASH: by score, best first (rendezvous)."""
        down, m = self.down_until, len(self.members)
        if scores is not None:
            order = sorted(range(m), key=scores.__getitem__, reverse=True)
        elif self.policy == "ROUND-ROBIN":
            order = [(i_start + j) % m for j in range(m)]
        else:
            order = list(range(m))
        for k in order[skip:]:
            if down[k] <= now:
                return k
        return -1


class RouteTable:
    """The worker's groups and filtered sockets, by event then key; owns their sockets."""

    def __init__(self, sndbuf: int = 0) -> None:
        self.by_event: dict[int, dict[str, Route]] = {}
        self.sndbuf = sndbuf
        self.sockets = 0
        # Stands in for a member whose socket could not be made (out of descriptors):
        # never sent on; that member counts as failed (and fails over).
        self._none = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

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
            control.failover_s, control.slot, control.group, [0.0] * len(members),
            [hashlib.blake2b(m.key.encode(), digest_size=16).digest() for m in members],
            filter_key=tuple(tuple(c) for c in control.conditions),  # type: ignore[misc]
        )  # fmt: skip

    def unsubscribe(self, event_id: int, key: str) -> None:
        routes = self.by_event.get(event_id)
        route = routes.pop(key, None) if routes is not None else None
        if route is None:
            return
        if routes is not None and not routes:
            del self.by_event[event_id]
        for member in route.members:
            if not member.shared:
                member.sock.close()
                self.sockets -= 1

    def _open(self, control: ControlPayload) -> Subscriber:
        """A member's own connected socket (a group's members never share one: a group
        has at most engine.targets.MAX_MEMBERS of them)."""
        transport, address = TRANSPORTS.index(control.transport), control.address()
        try:
            sock = socket.socket(control.family, socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("group member %s: no socket (%s); counted as failed", control.key, exc)
            sub = Subscriber(
                control.key, transport, control.family, address, self._none,
                connected=False, shared=True,
            )  # fmt: skip
            sub.last_errno = exc.errno or errno.EMFILE
            sub.slot = control.slot
            return sub
        sock.setblocking(False)
        if self.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        self.sockets += 1
        sub = Subscriber(
            control.key, transport, control.family, address, sock, connected=False, shared=False
        )
        sub.slot = control.slot
        SubscriberTable.connect(sub, time.monotonic())
        return sub

    def close(self) -> None:
        for routes in self.by_event.values():
            for route in routes.values():
                for member in route.members:
                    if not member.shared:
                        member.sock.close()
        self.by_event.clear()
        self._none.close()


class RouteSender:
    """Sends one batch's events to the routes that want them (see the module doc)."""

    def __init__(
        self,
        table: RouteTable,
        sender: BatchSender,
        region: Region,
        layout: CounterLayout,
        add: Callable[[int, int], None],
        set_: Callable[[int, int], None],
        spare: int,
        unix_wait_s: float,
    ) -> None:
        self.table = table
        self.sender = sender
        self.region = region
        self.layout = layout
        self.add = add
        self.set = set_
        self.spare = spare  # first iovec entry of the table's second half
        self.unix_wait_s = unix_wait_s
        self.i_sent = layout.scalar("pairs_sent")
        self.i_failed = layout.scalar("pairs_failed")
        self.i_filtered = layout.scalar("pairs_filtered")
        self.i_failovers = layout.scalar("failovers")
        self._bytes: dict[int, tuple[list[int], int]] = {}  # id(entries) -> their bytes

    def send(self, n: int, eids: list[int], lengths: list[int], deadline: list[float]) -> int:
        """Entries [0, n) of the batch; returns the pairs handled. `deadline` holds
        the batch's UNIX wait deadline (shared with the plain sends; 0 = not started)."""
        by_event = self.table.by_event
        params: dict[int, Any] = {}  # batch index -> decoded params: once per event
        self._bytes.clear()
        pairs = 0
        positions: dict[int, list[int]] = {}
        for i in range(n):
            if eids[i] in by_event:
                positions.setdefault(eids[i], []).append(i)
        verdicts: dict[tuple[tuple[str, str], ...], list[int]] = {}  # filter -> kept entries
        for eid, idx in positions.items():
            verdicts.clear()
            for route in by_event[eid].values():
                pairs += route.weight * len(idx)
                keep = idx
                if route.conditions:
                    shared = verdicts.get(route.filter_key)
                    if shared is None:
                        shared = verdicts[route.filter_key] = [
                            i for i in idx if route.matches(self._params(i, params))
                        ]
                    keep = shared
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
        all_up = max(down) <= now
        hashed = route.policy == "HASH"
        starts: dict[int, int] = {}  # ROUND-ROBIN: each event's turn
        scores: dict[int, list[bytes]] = {}  # HASH: each event's member scores
        pending: dict[int, list[int]] = {}
        failed: list[int] = []
        for i in keep:
            if hashed:
                s = scores[i] = route.hash_scores(self._params(i, params))
                k = max(range(m), key=s.__getitem__) if all_up else route.choose(0, s, 0, now)
            elif route.policy == "ROUND-ROBIN":
                starts[i] = start = route.next_rr
                k = start if all_up else route.choose(start, None, 0, now)
                if k >= 0:
                    route.next_rr = (k + 1) % m
            else:
                k = 0 if all_up else route.choose(0, None, 0, now)
            if k < 0:
                failed.append(i)
            else:
                pending.setdefault(k, []).append(i)
        rounds = moved = 0
        while pending and rounds <= m:  # each round takes a member down: bounded
            if rounds:  # the next member gets a UNIX wait of its own (at most m per batch)
                deadline[0] = 0.0
            rounds += 1
            current, pending = pending, {}
            for k, lst in current.items():
                unsent = self._send_member(route, k, eid, lst, lengths, deadline, stop=True)
                if not unsent:
                    continue
                t = time.monotonic()
                down[k] = t + route.failover_s
                for i in unsent:  # k is down now: the next member up in the event's order
                    nxt = route.choose(starts.get(i, 0), scores.get(i), 0, t)
                    if nxt < 0:
                        failed.append(i)
                    else:
                        pending.setdefault(nxt, []).append(i)
                        moved += 1
        if moved:
            self.add(self.i_failovers, moved)
        if route.group >= 0:
            lay = self.layout
            if moved:
                self.add(lay.group(route.group, 0), moved)
            later = time.monotonic()
            self.set(lay.group(route.group, 1), sum(d > later for d in down))
        if failed:
            err = next((s.last_errno for s in route.members if s.last_errno), errno.EIO)
            transport = route.members[0].transport
            self.add(self.layout.failure(transport, reason_index(err)), len(failed))
            self.add(self.i_failed, len(failed))
            if route.slot >= 0:
                self.region.count_subscriber(route.slot, 0, len(failed))

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
        now = time.monotonic()
        if sub.shared or (
            not sub.connected and (now < sub.retry_at or not SubscriberTable.connect(sub, now))
        ):
            unsent = list(idx)
            errs = [(0, sub.last_errno)] * len(idx)
        else:
            iov = sender.iov_words
            if idx[-1] - idx[0] == len(idx) - 1:  # a contiguous run: send it in place
                base = idx[0]
            else:  # a compact copy in the table's second half
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
        lay = self.layout
        if unsent:
            done = set(unsent)
            nbytes = sum(lengths[i] for i in idx if i not in done)
        else:  # entry lists are shared by routes (one filter verdict): sum each once
            cached = self._bytes.get(id(idx))
            if cached is None or cached[0] is not idx:
                cached = self._bytes[id(idx)] = (idx, sum([lengths[i] for i in idx]))
            nbytes = cached[1]
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
