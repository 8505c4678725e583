"""Which worker holds which subscriber, and the control records that tell it so.

The producer keeps its own view of every worker's subscriber table (`WorkerRoute`):
how many subscribers of each event a worker holds (the fan-out written into each
event record), and the control records sent to it, each with the ring position
it ends at. A restarted worker gets the table as of its ring's read position:
the records it had consumed, folded into a base table. Control records never
drop: when a ring is full they wait in `pending`, and events for that worker
drop (counted) until they are in, so nothing overtakes them.

Expiry is routed here too, so the raise path can act on it without touching the
registry (whose lock a state-file write may hold): every routed subscription
with an expiry is in a heap, and `expire(now)` unsubscribes the ones due, at
once, in ring order. The registry's own sweep catches up later, off the raise
path; its "removed" for a subscription already expired here changes nothing.

Not thread-safe: the engine calls everything here under its raise-path lock.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.address import Destination
from engine.shm.counters import GROUP_SLOTS, SUBSCRIBER_SLOTS, Region
from engine.shm.ring import (
    CONTROL_ENCODER,
    KIND_SUBSCRIBE,
    KIND_UNSUBSCRIBE,
    ControlPayload,
    Ring,
)
from engine.subscriptions import Change, Subscriber
from engine.targets import Group


@dataclass(slots=True)
class WorkerRoute:
    """The producer's view of one worker: what its table holds, what it was sent."""

    fanout: dict[int, int] = field(default_factory=dict)  # event id -> subscribers here
    keys: dict[str, int] = field(default_factory=dict)  # subscriber key -> its events here
    # (end position, kind, event id, payload); position -1 while still pending
    log: deque[tuple[int, int, int, ControlPayload]] = field(default_factory=deque)
    # The table at log[0], oldest first: (event id, key) -> control (a dict, so that
    # folding an unsubscribe is O(1)).
    base: dict[tuple[int, str], ControlPayload] = field(default_factory=dict)
    # Waiting for room, in order: always the last len(pending) entries of `log`.
    pending: deque[tuple[int, int, bytes]] = field(default_factory=deque)
    pairs_queued: int = 0
    consumed_seen: int = 0  # the worker's pairs_consumed, as last read (may lag)
    pairs_dropped: int = 0
    records_dropped: int = 0
    # Per-subscriber counter slots in this worker's region, by key (-1: none, counted
    # in the aggregates only, for as long as the key stays here). A key that leaves
    # frees its slot; the slot is given again, zeroed, only once the worker has read
    # past the record that removed the key, so a slot's counts belong to one key.
    slots: dict[str, int] = field(default_factory=dict)
    next_slot: int = 0  # the slots from here on were never given
    # Freed slots, oldest first: [slot, ring position the removing record ends at;
    # -1 while it waits for room]; those still without a position, with that record.
    retired: deque[list[int]] = field(default_factory=deque)
    unplaced: deque[tuple[list[int], ControlPayload]] = field(default_factory=deque)
    reset: Callable[[int], None] | None = None  # zeroes a slot's counts (the region's)

    # Group counter slots (counters.GROUP_SLOTS), by subscription key; never reused.
    group_slots: dict[str, int] = field(default_factory=dict)

    def group_for(self, key: str) -> int:
        slot = self.group_slots.get(key)
        if slot is None:
            if len(self.group_slots) >= GROUP_SLOTS:
                return -1  # counted in the aggregate failovers only
            slot = self.group_slots[key] = len(self.group_slots)
        return slot

    def slot_for(self, key: str, read_pos: int = -1) -> int:
        """`key`'s slot, given one if it has none: the oldest freed slot if the worker
        has read (`read_pos`: its ring's read position) past the record that freed it,
        zeroed; else one never given; else -1."""
        slot = self.slots.get(key)
        if slot is None:
            retired = self.retired
            if retired and 0 <= retired[0][1] <= read_pos:
                slot = retired.popleft()[0]
                if self.reset is not None:
                    self.reset(slot)
            elif self.next_slot < SUBSCRIBER_SLOTS:
                slot = self.next_slot
                self.next_slot += 1
            else:
                slot = -1
            self.slots[key] = slot
        return slot

    def retire(self, key: str, control: ControlPayload) -> None:
        """`key` left this worker; `control` is the record that removes it."""
        slot = self.slots.pop(key, -1)
        if slot >= 0:
            entry = [slot, -1]
            self.retired.append(entry)
            self.unplaced.append((entry, control))

    def placed(self, control: ControlPayload, end: int) -> None:
        """The record of `control` went into the ring, ending at position `end`."""
        if self.unplaced and self.unplaced[0][1] is control:
            self.unplaced.popleft()[0][1] = end


class Router:
    """Routes subscription changes to workers and events to the workers that need them."""

    def __init__(self, rings: list[Ring], regions: Sequence[Region] = ()) -> None:
        """`regions`: the workers' counter regions (their per-subscriber slots are
        zeroed before a freed slot is given again); none in tests of the bookkeeping."""
        self.rings = rings
        self.routes = [
            WorkerRoute(reset=regions[k].reset_subscriber if regions else None)
            for k in range(len(rings))
        ]
        self.owner: dict[str, int] = {}  # subscriber key -> worker index
        self.targets: dict[int, list[tuple[int, int]]] = {}  # event id -> [(worker, fanout)]
        self.routed: dict[tuple[int, str], Subscriber] = {}  # (event id, key) -> subscriber
        # Groups and filtered subscribers (engine.targets) of one event all live in
        # one worker, which decodes an event's params once for all of them.
        self.special_owner: dict[int, int] = {}  # event id -> worker
        self.special: dict[tuple[int, str], int] = {}  # (event id, key) -> fan-out weight
        self.special_count: dict[int, int] = {}  # event id -> its groups/filtered here
        self.failover_s = 30.0  # [engine] failover_timeout
        self._expires: dict[tuple[int, str], float] = {}  # (event id, key) -> instant
        self._heap: list[tuple[float, int, str]] = []  # lazy: stale entries are skipped
        self.next_expiry = math.inf  # no routed subscription expires before this

    def apply(self, change: Change) -> None:
        """Route a registry change: added/removed go to the worker as control
        records; a refresh only moves the expiry. Idempotent against `expire()`:
        a removal of what already expired here is nothing, a refresh of it adds
        it again."""
        sub = change.subscriber
        member = (change.event_id, sub.key)
        if change.kind == "removed":
            if member in self.routed:
                self._route(False, change.event_id, self.routed[member])
        elif member not in self.routed:
            self._route(True, change.event_id, sub)
        self._set_expiry(member, sub.expires_at if change.kind != "removed" else None)

    def expire(self, now: float) -> int:
        """Unsubscribe every routed subscription due at `now` (the registry's clock);
        return how many."""
        heap, expires, count = self._heap, self._expires, 0
        while heap and heap[0][0] <= now:
            instant, eid, key = heapq.heappop(heap)
            member = (eid, key)
            if expires.get(member) == instant:
                del expires[member]
                self._route(False, eid, self.routed[member])
                count += 1
        self.next_expiry = heap[0][0] if heap else math.inf
        return count

    def _set_expiry(self, member: tuple[int, str], instant: float | None) -> None:
        if instant is None:
            self._expires.pop(member, None)
            return
        self._expires[member] = instant
        heapq.heappush(self._heap, (instant, *member))
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._expires):
            # Drop stale entries, amortised O(1) per change.
            self._heap = [(t, e, k) for (e, k), t in self._expires.items()]
            heapq.heapify(self._heap)
        self.next_expiry = self._heap[0][0]

    def _route(self, add: bool, eid: int, sub: Subscriber) -> None:
        dest = sub.dest
        if not isinstance(dest, Destination) or sub.filter is not None:
            self._route_special(add, eid, sub)
            return
        key = dest.key
        if add:
            self.routed[(eid, key)] = sub
            worker = self.owner.get(key)
            if worker is None:  # a new socket goes to the worker holding the fewest
                worker = min(range(len(self.routes)), key=lambda k: len(self.routes[k].keys))
                self.owner[key] = worker
            route = self.routes[worker]
            route.keys[key] = route.keys.get(key, 0) + 1
            route.fanout[eid] = route.fanout.get(eid, 0) + 1
            kind = KIND_SUBSCRIBE
        else:
            del self.routed[(eid, key)]
            worker = self.owner[key]
            route = self.routes[worker]
            route.fanout[eid] -= 1
            if not route.fanout[eid]:
                del route.fanout[eid]
            route.keys[key] -= 1
            if not route.keys[key]:
                del route.keys[key]
                del self.owner[key]
            kind = KIND_UNSUBSCRIBE
        sockaddr: str | list[str | int] = (
            dest.sockaddr if isinstance(dest.sockaddr, str) else list(dest.sockaddr)
        )
        slot = route.slot_for(key, self.rings[worker].read_pos) if add else route.slots[key]
        control = ControlPayload(key, dest.transport, dest.family, sockaddr, slot)
        if not add and key not in route.keys:
            route.retire(key, control)
        self._send_control(worker, kind, eid, control)

    def _send_control(self, worker: int, kind: int, eid: int, control: ControlPayload) -> None:
        route = self.routes[worker]
        route.pending.append((kind, eid, CONTROL_ENCODER.encode(control)))
        route.log.append((-1, kind, eid, control))
        self._flush(worker)
        self._rebuild_targets(eid)

    def _route_special(self, add: bool, eid: int, sub: Subscriber) -> None:
        """A group or a filtered subscriber: one control record with its members
        and conditions, in the worker that holds the event's others; its fan-out
        weight is the datagrams one event makes (PARALLEL: one per member)."""
        key, dest = sub.key, sub.dest
        member = (eid, key)
        if add:
            worker = self.special_owner.get(eid)
            if worker is None:
                worker = min(range(len(self.routes)), key=lambda k: len(self.routes[k].keys))
                self.special_owner[eid] = worker
            weight = (
                len(dest.members) if isinstance(dest, Group) and dest.policy == "PARALLEL" else 1
            )
            self.routed[member] = sub
            self.special[member] = weight
            kind = KIND_SUBSCRIBE
        else:
            worker = self.special_owner[eid]
            weight = self.special.pop(member)
            del self.routed[member]
            kind = KIND_UNSUBSCRIBE
        route = self.routes[worker]
        route.fanout[eid] = route.fanout.get(eid, 0) + (weight if add else -weight)
        if not route.fanout[eid]:
            del route.fanout[eid]
        route.keys[key] = route.keys.get(key, 0) + (1 if add else -1)
        if not route.keys[key]:
            del route.keys[key]
        count = self.special_count[eid] = self.special_count.get(eid, 0) + (1 if add else -1)
        if not count:
            del self.special_count[eid]
            self.special_owner.pop(eid, None)
        conditions = [] if sub.filter is None else list(sub.filter.conditions)
        policy: str
        sockaddr: str | list[str | int]
        group = -1
        if isinstance(dest, Group):
            members = [_plain(m, route.slot_for(member_key(key, m))) for m in dest.members]
            policy, hash_param = dest.policy, dest.hash_param
            transport, family, sockaddr = "udp", 0, ""
            group = route.group_for(f"{eid} {key}")
        else:
            members, policy, hash_param = [], "SINGLE", ""
            transport, family = dest.transport, dest.family
            sockaddr = _plain(dest, -1).sockaddr
        control = ControlPayload(
            key, transport, family, sockaddr, route.slot_for(key), policy, members,
            conditions, hash_param, self.failover_s, group,
        )  # fmt: skip
        self._send_control(worker, kind, eid, control)

    def flush(self) -> bool:
        """Move waiting control records into their rings where they fit now; True
        when any record went in (its worker may need waking)."""
        appended = False
        for worker in range(len(self.routes)):
            appended = self._flush(worker) or appended
        return appended

    def _flush(self, worker: int) -> bool:
        route = self.routes[worker]
        if not route.pending:
            return False
        ring = self.rings[worker]
        appended = False
        # The log entries without a position are its last ones, pending's, in the same
        # order (positions are given in order, and fold() stops at the first without):
        # indexing a deque near its end is O(1).
        i = len(route.log) - len(route.pending)
        while route.pending:
            kind, eid, payload = route.pending[0]
            if not ring.try_append(kind, eid, 0, time.monotonic_ns(), payload):
                return appended
            appended = True
            route.pending.popleft()
            _, k, e, control = route.log[i]
            route.log[i] = (ring.write_pos, k, e, control)
            route.placed(control, ring.write_pos)
            i += 1
        return appended

    def fold(self, worker: int, read_pos: int) -> None:
        """Fold the control records the worker has consumed into its base table."""
        route = self.routes[worker]
        while route.log and 0 <= route.log[0][0] <= read_pos:
            _, kind, eid, control = route.log.popleft()
            if kind == KIND_SUBSCRIBE:
                route.base[(eid, control.key)] = control
            else:
                route.base.pop((eid, control.key), None)

    def snapshot(self, worker: int, read_pos: int) -> list[tuple[int, ControlPayload]]:
        """The worker's table as of ring position `read_pos` (oldest first)."""
        self.fold(worker, read_pos)
        return [(eid, control) for (eid, _), control in self.routes[worker].base.items()]

    def _rebuild_targets(self, eid: int) -> None:
        targets = [
            (worker, route.fanout[eid])
            for worker, route in enumerate(self.routes)
            if route.fanout.get(eid)
        ]
        if targets:
            self.targets[eid] = targets
        else:
            self.targets.pop(eid, None)


def member_key(key: str, member: Destination) -> str:
    """A group member's per-subscriber counter key (its slot's name)."""
    return f"{key} member={member.key}"


def _plain(dest: Destination, slot: int) -> ControlPayload:
    sockaddr: str | list[str | int] = (
        dest.sockaddr if isinstance(dest.sockaddr, str) else list(dest.sockaddr)
    )
    return ControlPayload(dest.key, dest.transport, dest.family, sockaddr, slot)
