"""engine/routing.py's bookkeeping on real in-process rings: control records that
wait for room keep their order and get their ring positions, and the table a
restarted worker gets (fold + snapshot) is what it had consumed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.address import parse_destination
from engine.routing import Router
from engine.shm.ring import CONTROL_DECODER, KIND_SUBSCRIBE, Ring, segment_size
from engine.shm.segment import Segment, segment_name
from engine.subscriptions import Change, Subscriber
from tests.support import unique_instance

CAPACITY = 4096  # the smallest ring: fills after a few dozen control records


@pytest.fixture
def ring() -> Iterator[Ring]:
    seg = Segment.create(segment_name(unique_instance("route"), "r"), segment_size(CAPACITY))
    Ring.format(seg.buf, CAPACITY)
    r = Ring(seg.buf)
    yield r
    r.release()
    seg.unlink()
    seg.close()


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
