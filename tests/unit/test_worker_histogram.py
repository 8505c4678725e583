"""The worker's latency histogram for big batches (workers.worker.latency_counts)
counts exactly what bisecting each event's delay counts, bucket bounds included."""

from __future__ import annotations

import bisect

from hypothesis import given
from hypothesis import strategies as st

from engine.shm.counters import LATENCY_BUCKETS_NS
from workers.worker import latency_counts

NOW = 10**15
# Delays on and around every bucket bound, and anything up to past the last one.
DELAYS = st.one_of(
    st.sampled_from([0, *LATENCY_BUCKETS_NS]),
    st.sampled_from(LATENCY_BUCKETS_NS).map(lambda b: b + 1),
    st.sampled_from(LATENCY_BUCKETS_NS).map(lambda b: b - 1),
    st.integers(0, 2 * LATENCY_BUCKETS_NS[-1]),
)


def per_event(now: int, stamps: list[int]) -> list[int]:
    counts = [0] * (len(LATENCY_BUCKETS_NS) + 1)
    for ts in stamps:
        counts[bisect.bisect_left(LATENCY_BUCKETS_NS, now - ts)] += 1
    return counts


@given(st.lists(DELAYS, min_size=1, max_size=300))
def test_bisecting_the_sorted_raise_times_counts_as_each_event_would(delays: list[int]) -> None:
    stamps = sorted(NOW - d for d in delays)
    assert latency_counts(NOW, stamps) == per_event(NOW, stamps)


def test_every_event_is_counted_once() -> None:
    stamps = sorted(NOW - d for d in (0, 5, LATENCY_BUCKETS_NS[3], 10 * LATENCY_BUCKETS_NS[-1]))
    counts = latency_counts(NOW, stamps)
    assert sum(counts) == 4
    assert counts[-1] == 1  # past the last bound: +Inf
