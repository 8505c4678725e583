"""The shared-memory ring on real segments, in this process (a consumer process:
integration/test_ring_consumer.py)."""

from __future__ import annotations

import platform
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.shm.ring import (
    HEADER_SIZE,
    KIND_EVENT,
    KIND_SUBSCRIBE,
    RECORD_HEADER_SIZE,
    Ring,
    check_architecture,
    segment_size,
)
from engine.shm.segment import Segment, list_segments, segment_name, segment_owner
from tests.helpers.support import RING_CAPACITY, unique_instance

CAPACITY = RING_CAPACITY  # the `ring` fixture's (tests/conftest.py)


def consume(ring: Ring) -> list[tuple[int, int, int, int, bytes]]:
    """Read everything pending the way a worker does, then release it."""
    out = []
    records = ring.records(ring.read_pos, ring.write_pos)
    for _pos, _nxt, kind, eid, fanout, ts, length in records:
        out.append((kind, eid, fanout, ts, ring.payload(_pos, length)))
    if records:
        ring.set_read_pos(records[-1][1], ring.statistics().records_read + len(records))
    return out


def test_header_layout_is_checked(ring: Ring) -> None:
    assert ring.capacity == CAPACITY
    raw = bytearray(segment_size(CAPACITY))
    with pytest.raises(ValueError, match="bad magic"):
        Ring(memoryview(raw))
    Ring.format(memoryview(raw), CAPACITY)
    raw[8] = 99  # version
    with pytest.raises(ValueError, match="version 99"):
        Ring(memoryview(raw))


def test_capacity_must_be_aligned() -> None:
    raw = bytearray(segment_size(8192))
    with pytest.raises(ValueError, match="multiple of 8"):
        Ring.format(memoryview(raw), 4100)


def test_records_round_trip_in_order_across_wraps(ring: Ring) -> None:
    sent = []
    got = []
    for i in range(500):  # many times around a 4 KiB ring
        payload = bytes([i % 251]) * (i * 7 % 300)
        assert ring.append(KIND_EVENT, i % 5, i % 3, 1000 + i, payload)
        sent.append((KIND_EVENT, i % 5, i % 3, 1000 + i, payload))
        if i % 4 == 3:
            got.extend(consume(ring))
    got.extend(consume(ring))
    assert got == sent
    stats = ring.statistics()
    assert stats.records_written == stats.records_read == 500
    assert stats.used_bytes == 0 and stats.drops == 0


def test_full_ring_refuses_and_counts_without_corruption(ring: Ring) -> None:
    payload = b"x" * 200
    accepted = 0
    while ring.append(KIND_EVENT, 1, 1, 0, payload):
        accepted += 1
    assert accepted == CAPACITY // (RECORD_HEADER_SIZE + 200)
    assert not ring.append(KIND_EVENT, 1, 1, 0, payload)
    assert ring.statistics().drops == 2
    records = consume(ring)
    assert len(records) == accepted and all(r[4] == payload for r in records)
    assert ring.append(KIND_EVENT, 1, 1, 0, payload)  # room again


def test_record_too_large_for_ring_is_an_error(ring: Ring) -> None:
    with pytest.raises(ValueError, match="exceeds the ring"):
        ring.append(KIND_EVENT, 0, 0, 0, b"x" * CAPACITY)


def test_pending_fanout_counts_unread_event_pairs(ring: Ring) -> None:
    ring.append(KIND_EVENT, 0, 4, 0, b"a")
    ring.append(KIND_SUBSCRIBE, 0, 0, 0, b"ctl")
    ring.append(KIND_EVENT, 0, 3, 0, b"b")
    assert ring.pending_fanout() == 7
    consume(ring)
    assert ring.pending_fanout() == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 700)), max_size=120))
def test_any_interleaving_of_appends_and_reads_matches_a_queue(
    ops: list[tuple[bool, int]],
) -> None:
    seg = Segment.create(segment_name(unique_instance("hyp"), "r"), segment_size(CAPACITY))
    try:
        Ring.format(seg.buf, CAPACITY)
        ring = Ring(seg.buf)
        model: deque[bytes] = deque()
        for n, (is_read, size) in enumerate(ops):
            if is_read:
                got = [r[4] for r in consume(ring)]
                assert got == list(model)
                model.clear()
            else:
                payload = n.to_bytes(2, "little") * (size // 2)
                if ring.append(KIND_EVENT, 0, 1, n, payload):
                    model.append(payload)
            assert 0 <= ring.statistics().used_bytes <= CAPACITY
        assert [r[4] for r in consume(ring)] == list(model)
        ring.release()
    finally:
        seg.unlink()
        seg.close()


def test_segment_names_carry_the_owner_pid() -> None:
    name = segment_name("inst", "ring0", pid=1234)
    assert name == "edg-inst-1234-ring0"
    assert segment_owner(name) == 1234
    assert segment_owner("edg-inst-ring0") is None


def test_segments_are_listed_by_instance() -> None:
    instance = unique_instance("list")
    seg = Segment.create(segment_name(instance, "ring0"), segment_size(CAPACITY))
    try:
        assert list_segments(instance) == [segment_name(instance, "ring0")]
        assert list_segments(instance + "x") == []
    finally:
        seg.unlink()
        seg.close()
    assert list_segments(instance) == []


def test_architecture_check(monkeypatch: pytest.MonkeyPatch) -> None:
    check_architecture()  # this machine is x86-64
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(RuntimeError, match="aarch64"):
        check_architecture()
    with pytest.raises(RuntimeError, match="store ordering"):
        Ring.format(memoryview(bytearray(HEADER_SIZE + CAPACITY)), CAPACITY)
