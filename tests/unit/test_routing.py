"""engine/routing.py's bookkeeping on real in-process rings: control records that
wait for room keep their order and get their ring positions, and the table a
restarted worker gets (fold + snapshot) is what it had consumed."""

from __future__ import annotations

from collections import deque

from engine.address import parse_destination
from engine.routing import Router, WorkerRoute
from engine.shm.counters import SUBSCRIBER_SLOTS
from engine.shm.ring import CONTROL_DECODER, KIND_SUBSCRIBE, ControlPayload, Ring
from engine.subscriptions import Change, Subscriber
from tests.helpers.support import RING_CAPACITY

CAPACITY = RING_CAPACITY  # the `ring` fixture's (tests/conftest.py)


def change(kind: str, eid: int, port: int) -> Change:
    dest = parse_destination(f"udp:127.0.0.1:{port}")
    return Change(kind, f"E_{eid}", eid, Subscriber(dest, None, 0.0))  # type: ignore[arg-type]


def consume(ring: Ring, records: int) -> list[tuple[bool, int, str]]:
    """Read up to `records` records the way a worker does; (subscribe?, event, key)."""
    out = []
    taken = ring.records(ring.read_pos, ring.write_pos)[:records]
    for pos, _nxt, kind, eid, _fanout, _ts, length in taken:
        control = CONTROL_DECODER.decode(bytes(ring.payload(pos, length)))
        out.append((kind == KIND_SUBSCRIBE, eid, control.key))
    if taken:
        ring.set_read_pos(taken[-1][1], ring.statistics().records_read + len(taken))
    return out


def test_waiting_control_records_keep_their_order_and_the_snapshot_follows(ring: Ring) -> None:
    router = Router([ring])
    route = router.routes[0]
    script = [change("added", e, 9000 + i) for i in range(60) for e in (0, 1)]
    script += [change("removed", 0, 9000 + i) for i in range(0, 60, 3)]
    script += [change("added", 0, 9000 + i) for i in range(0, 60, 6)]  # back again: last
    for c in script:
        router.apply(c)
    assert route.pending, "the ring should be full, with records waiting"
    consumed: list[tuple[bool, int, str]] = []
    while route.pending or ring.read_pos != ring.write_pos:
        consumed += consume(ring, 7)
        router.flush()
        # every record in the ring has its position; the waiting ones are the log's tail
        positions = [entry[0] for entry in route.log]
        placed = [p for p in positions if p >= 0]
        assert placed == sorted(placed) and positions[len(placed) :] == [-1] * len(route.pending)
        # a worker restarted now would get exactly what it had consumed
        table: dict[tuple[int, str], None] = {}
        for subscribe, eid, key in consumed:
            if subscribe:
                table[(eid, key)] = None
            else:
                del table[(eid, key)]
        snapshot = router.snapshot(0, ring.read_pos)
        assert [(eid, c.key) for eid, c in snapshot] == list(table)
    expected = [(c.kind != "removed", c.event_id, c.subscriber.dest.key) for c in script]
    assert consumed == expected
    assert not route.log  # all folded
    assert router.targets == {0: [(0, 50)], 1: [(0, 60)]}


def test_a_freed_counter_slot_is_given_again_only_after_the_worker_read_past_it(
    ring: Ring,
) -> None:
    """A key's slot is freed when it leaves, and given again (zeroed first) only once
    the worker has read the record that removed it: until then it may still count
    the datagrams queued before that record, for the key that left."""
    zeroed: list[int] = []

    class Region:  # the one thing the router asks of a counter region
        def reset_subscriber(self, slot: int) -> None:
            zeroed.append(slot)

    router = Router([ring], [Region()])  # type: ignore[list-item]
    route = router.routes[0]

    def slot_of(port: int) -> int:
        return route.slots[parse_destination(f"udp:127.0.0.1:{port}").key]

    router.apply(change("added", 0, 9000))
    router.apply(change("added", 1, 9000))
    router.apply(change("removed", 0, 9000))  # still here for event 1: keeps its slot
    router.apply(change("added", 0, 9001))
    assert (slot_of(9000), slot_of(9001), route.retired) == (0, 1, deque())
    router.apply(change("removed", 1, 9000))  # gone: slot 0 freed, not yet read past
    router.apply(change("added", 0, 9002))
    assert (slot_of(9002), zeroed) == (2, [])  # a new one meanwhile
    consume(ring, 4)  # up to, not including, the record that removed 9000
    router.apply(change("added", 0, 9003))
    assert (slot_of(9003), zeroed) == (3, [])
    consume(ring, 1)
    router.apply(change("added", 0, 9004))
    assert (slot_of(9004), zeroed) == (0, [0])  # now it is given again, zeroed
    # Records that waited for room get their position when they go in.
    for port in range(9100, 9160):
        router.apply(change("added", 0, port))
    for port in range(9100, 9160):
        router.apply(change("removed", 0, port))
    assert route.pending and len(route.unplaced) > 0
    while route.pending or ring.read_pos != ring.write_pos:
        consume(ring, 7)
        router.flush()
    assert not route.unplaced
    ends = [end for _, end in route.retired]
    assert len(ends) == 60 and ends == sorted(ends) and ends[0] > 0 and ends[-1] <= ring.read_pos
    router.apply(change("added", 0, 9200))
    assert zeroed == [0, route.slots[parse_destination("udp:127.0.0.1:9200").key]]


def test_a_key_without_a_slot_keeps_none_while_it_stays() -> None:
    """Past SUBSCRIBER_SLOTS a key gets none (-1), for as long as it stays on that
    worker: a slot freed meanwhile goes to a newcomer, never to it (its worker holds
    it as slot-less)."""
    route = WorkerRoute(next_slot=SUBSCRIBER_SLOTS)
    assert route.slot_for("a", 0) == -1
    route.slots["b"] = 7
    route.retire("b", ControlPayload("b", "udp", 2, ["127.0.0.1", 1], 7))
    route.retired[0][1] = 100  # its record went in, ending at 100
    assert route.slot_for("a", 1000) == -1
    assert route.slot_for("c", 99) == -1  # not read past yet
    assert route.slot_for("c", 100) == -1  # "c" was given none: it keeps none
    assert route.slot_for("d", 100) == 7
