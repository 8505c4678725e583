"""The accounting identity check catches every kind of mismatch."""

from __future__ import annotations

import dataclasses

from engine.shm.ring import RingStatistics
from engine.statistics import EngineStatistics, WorkerStatistics


def worker(**changes: object) -> WorkerStatistics:
    base = WorkerStatistics(
        index=0, pid=1, alive=True, restarts=0,
        ring=RingStatistics(capacity=4096, used_bytes=48, records_written=3, records_read=2,
                            drops=0),
        pairs_queued=7, pairs_dropped=0, records_dropped=0, pairs_sent=3, pairs_failed=1,
        pairs_consumed=5, pairs_stale=1, redelivered_pairs=0, subscribers=2, shared_subscribers=0,
        failures={("udp", "econnrefused"): 1}, counters=(), sleeps=0,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def stats(*workers: WorkerStatistics, raised: int = 5, queued: int = 3) -> EngineStatistics:
    return EngineStatistics(
        events_raised={"E": raised}, events_oversize={"E": 1}, events_queued=queued,
        drops={"ring_full": 0, "no_subscribers": 1}, workers=workers,
        event_names={0: "E"}, max_events=4,
    )  # fmt: skip


def test_consistent_numbers_pass() -> None:
    s = stats(worker())
    assert s.identity_errors() == []
    assert s.workers[0].pairs_in_ring == 2


def test_each_mismatch_is_reported() -> None:
    assert "events: raised 6" in stats(worker(), raised=6).identity_errors()[0]
    wrong = stats(worker(pairs_consumed=6)).identity_errors()[0]
    assert "consumed 6 != sent 3 + failed 1 + stale 1" in wrong
    assert "by reason" in stats(worker(failures={})).identity_errors()[0]
    empty_ring = dataclasses.replace(worker().ring, used_bytes=0)
    assert "pairs in ring" in stats(worker(ring=empty_ring)).identity_errors()[0]
    assert "pairs in ring" in stats(worker(pairs_queued=4)).identity_errors()[0]
