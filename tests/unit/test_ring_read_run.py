"""read_batch's fast path for runs of one payload length (Ring._read_run) reads
exactly what the record-at-a-time loop reads: the same batch, iovec table, stale
records, positions and fan-out, whatever the mix of lengths, kinds, fan-outs,
stale records, batch limits and the wrap at the end of the data area."""

from __future__ import annotations

import ctypes

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.shm.ring import _READ_POS, _WRITE_POS, KIND_EVENT, KIND_SUBSCRIBE, Ring, segment_size
from engine.shm.segment import Segment, segment_name
from tests.helpers.support import unique_instance

CAPACITY = 8192  # small: runs meet the end of the data area and wrap
BASE = 1 << 40  # a made-up address of the data area: only compared, never used

RECORD = st.tuples(
    st.sampled_from([KIND_EVENT] * 12 + [KIND_SUBSCRIBE]),
    st.sampled_from([8, 8, 8, 8, 13, 40, 120]),  # lengths: mostly one, so runs form
    st.integers(1, 3),  # event id
    st.integers(0, 5),  # fan-out
    st.sampled_from([0, 0, 0, 1]),  # 1: raised long ago (stale when a limit is set)
)


def read_all(ring: Ring, bulk: bool, params: tuple[int, int, int, int]) -> list[object]:
    """Every batch read_batch returns from the current read position on."""
    batch_max, max_pairs, min_events, stale_before = params
    table = (ctypes.c_uint64 * (2 * batch_max))()
    iov = memoryview(table).cast("B").cast("Q")
    out: list[object] = []
    pos = ring.read_pos
    ring._run_guess = 4 if bulk else 0  # 0: the record-at-a-time loop only
    while pos < ring.write_pos:
        eids: list[int] = []
        lengths: list[int] = []
        stamps: list[int] = []
        stale: list[tuple[int, int]] = []
        result = ring.read_batch(
            pos, ring.write_pos, batch_max, iov, BASE, eids, lengths, stamps,
            stale_before, stale, max_pairs, min_events,
        )  # fmt: skip
        end, _records, _consumed, n, _control = result
        out.append((result, eids, lengths, stamps, stale, list(iov[: 2 * n])))
        assert end > pos
        pos = end
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(RECORD, min_size=1, max_size=120),
    st.integers(1, 64),  # batch_max
    st.sampled_from([1 << 62, 3, 10, 40]),  # max_pairs
    st.integers(1, 8),  # min_events
    st.booleans(),  # a stale limit
    st.integers(0, CAPACITY - 8).map(lambda n: n - n % 8),  # where the ring starts
)
def test_the_fast_path_reads_what_the_loop_reads(
    records: list[tuple[int, int, int, int, int]],
    batch_max: int,
    max_pairs: int,
    min_events: int,
    stale_limit: bool,
    start: int,
) -> None:
    seg = Segment.create(segment_name(unique_instance("run"), "r"), segment_size(CAPACITY))
    try:
        Ring.format(seg.buf, CAPACITY)
        producer = Ring(seg.buf)
        # Start part-way into the data area: move both positions past `start` bytes.
        producer.words[_WRITE_POS] = producer.words[_READ_POS] = start
        producer._wpos = producer._published = producer._rpos = start
        bulk, loop = Ring(seg.buf), Ring(seg.buf)
        try:
            for written, (kind, length, eid, fanout, old) in enumerate(records):
                ts = 1_000 if old else 10**12 + written
                if not producer.try_append(kind, eid, fanout, ts, b"p" * length):
                    break
            params = (batch_max, max_pairs, min_events, 10**9 if stale_limit else 0)
            assert read_all(bulk, True, params) == read_all(loop, False, params)
        finally:
            for r in (producer, bulk, loop):
                r.release()
    finally:
        seg.unlink()
        seg.close()
