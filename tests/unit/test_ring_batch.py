"""The ring's batched writes (engine/shm/ring.py: stage, stage_many, publish): the
consumer sees a batch only once it is published, whole and in order, across wraps."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.shm.ring import KIND_EVENT, RECORD_HEADER_SIZE, Ring, segment_size
from engine.shm.segment import Segment, segment_name
from tests.helpers.support import RING_CAPACITY, unique_instance
from tests.unit.test_ring import consume

CAPACITY = RING_CAPACITY  # the `ring` fixture's (tests/conftest.py)


def test_staged_records_are_invisible_until_published(ring: Ring) -> None:
    assert ring.stage(KIND_EVENT, 1, 2, 10, b"a" * 5)
    assert ring.stage_many(3, 4, 20, [b"b", b"cc", b"ddd"], 0, 3) == 3
    assert ring.write_pos == 0 and ring.statistics().records_written == 0
    assert consume(ring) == []
    ring.publish()
    assert ring.published == ring.write_pos == 4 * RECORD_HEADER_SIZE + 8 * 4
    assert ring.statistics().records_written == 4
    assert consume(ring) == [
        (KIND_EVENT, 1, 2, 10, b"a" * 5),
        (KIND_EVENT, 3, 4, 20, b"b"),
        (KIND_EVENT, 3, 4, 20, b"cc"),
        (KIND_EVENT, 3, 4, 20, b"ddd"),
    ]
    ring.publish()  # nothing staged: nothing moves
    assert ring.write_pos == ring.read_pos


def test_try_append_publishes_what_was_staged_before_it(ring: Ring) -> None:
    assert ring.stage(KIND_EVENT, 1, 1, 0, b"first")
    assert ring.try_append(KIND_EVENT, 2, 1, 0, b"second")
    assert [r[4] for r in consume(ring)] == [b"first", b"second"]


def test_stage_counts_no_drop_and_note_drop_counts_one(ring: Ring) -> None:
    big = b"x" * 1000
    while ring.stage(KIND_EVENT, 0, 1, 0, big):
        pass
    assert ring.statistics().drops == 0
    ring.note_drop()
    assert ring.statistics().drops == 1
    ring.publish()
    assert len(consume(ring)) == CAPACITY // (RECORD_HEADER_SIZE + 1000)


def test_stage_many_stops_at_the_end_of_the_data_area(ring: Ring) -> None:
    payloads = [bytes([i]) * 100 for i in range(20)]  # 128-byte records
    assert ring.try_append(KIND_EVENT, 0, 1, 0, b"y" * 3000)  # 3024 bytes used
    consume(ring)
    taken = ring.stage_many(7, 1, 5, payloads, 0, 20)
    assert taken == (CAPACITY - 3024) // 128  # up to the end, no wrap inside
    rest = taken
    while rest < 20 and ring.stage(KIND_EVENT, 7, 1, 5, payloads[rest]):  # wraps
        rest += 1
    ring.publish()
    got = [r[4] for r in consume(ring)]
    assert got == payloads[:rest]
    assert rest == 20


def test_stage_many_takes_a_slice_and_pads(ring: Ring) -> None:
    payloads = [b"", b"1", b"12345678", b"123456789"]
    assert ring.stage_many(9, 3, 7, payloads, 1, 4) == 3
    ring.publish()
    assert consume(ring) == [(KIND_EVENT, 9, 3, 7, p) for p in payloads[1:]]
    assert ring.read_pos == 3 * RECORD_HEADER_SIZE + 8 + 8 + 16


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["many", "one", "publish", "read"]),
            st.lists(st.integers(0, 400), min_size=1, max_size=12),
        ),
        max_size=80,
    )
)
def test_any_mix_of_staging_publishing_and_reading_matches_a_queue(
    ops: list[tuple[str, list[int]]],
) -> None:
    seg = Segment.create(segment_name(unique_instance("hypb"), "r"), segment_size(CAPACITY))
    try:
        Ring.format(seg.buf, CAPACITY)
        ring = Ring(seg.buf)
        published: deque[bytes] = deque()  # what the consumer may see
        staged: list[bytes] = []
        serial = 0
        for op, sizes in ops:
            payloads = []
            for size in sizes:
                serial += 1
                payloads.append(serial.to_bytes(2, "little") * (size // 2))
            if op == "many":
                n = ring.stage_many(1, 1, 0, payloads, 0, len(payloads))
                staged.extend(payloads[:n])
            elif op == "one":
                for p in payloads:
                    if ring.stage(KIND_EVENT, 1, 1, 0, p):
                        staged.append(p)
            elif op == "publish":
                ring.publish()
                published.extend(staged)
                staged.clear()
            else:
                assert [r[4] for r in consume(ring)] == list(published)
                published.clear()
            assert 0 <= ring.statistics().used_bytes <= CAPACITY
        ring.publish()
        published.extend(staged)
        assert [r[4] for r in consume(ring)] == list(published)
        ring.release()
    finally:
        seg.unlink()
        seg.close()
