"""The ring's doorbell (shm/doorbell.py): a real eventfd, a consumer thread asleep on a
real ring in this process, and the supervisor's lost-wake-up net."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from engine.shm.doorbell import Doorbell
from engine.shm.ring import _FENCE, _SLEEP_SEQ, KIND_EVENT, Ring
from engine.shm.segment import Segment


@pytest.fixture
def doorbell() -> Iterator[Doorbell]:
    bell = Doorbell.create()
    yield bell
    bell.close()


def start_sleeper(ring: Ring) -> threading.Event:
    """A consumer thread asleep on `ring` from its read position; the event is set
    when its sleep returns."""
    woke = threading.Event()

    def worker() -> None:
        ring.sleep(ring.read_pos)
        woke.set()

    threading.Thread(target=worker, daemon=True).start()
    return woke


def test_a_ring_before_the_wait_is_kept(doorbell: Doorbell) -> None:
    doorbell.ring()
    doorbell.ring()
    done = threading.Event()

    def waiter() -> None:
        doorbell.wait()  # at once: rung before (twice, one wake-up)
        done.set()

    threading.Thread(target=waiter, daemon=True).start()
    assert done.wait(5), "a ring that landed before the wait was lost"


def test_wait_resets_the_count_so_the_next_wait_sleeps(doorbell: Doorbell) -> None:
    doorbell.ring()
    doorbell.wait()
    woke = threading.Event()

    def waiter() -> None:
        doorbell.wait()
        woke.set()

    threading.Thread(target=waiter, daemon=True).start()
    assert not woke.wait(0.2), "the wait returned without a new ring"
    doorbell.ring()
    assert woke.wait(5), "a ring did not wake the waiter"


def test_a_consumer_without_a_doorbell_cannot_sleep(ring: Ring) -> None:
    with pytest.raises(RuntimeError, match="no doorbell"):
        ring.sleep(ring.read_pos)


def test_the_consumer_sleeps_until_the_producer_rings(segment: Segment, doorbell: Doorbell) -> None:
    producer = Ring(segment.buf, doorbell)
    consumer = Ring(segment.buf, doorbell)
    try:
        woke = start_sleeper(consumer)
        deadline = time.monotonic() + 5
        while producer.sleeps == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert producer.stalled_sleep() is None  # asleep, nothing published: not stalled
        assert producer.try_append(KIND_EVENT, 1, 1, time.monotonic_ns(), b"x")
        assert not woke.wait(0.1), "the consumer woke before anyone rang"
        assert producer.stalled_sleep() is not None  # asleep with a record waiting
        assert producer.wake_if_sleeping()
        assert not producer.wake_if_sleeping()  # one ring per sleep
        assert woke.wait(5), "the ring did not wake the consumer"
        assert producer.stalled_sleep() is None
    finally:
        producer.release()
        consumer.release()


def test_a_record_published_before_the_sleep_is_not_slept_through(
    segment: Segment, doorbell: Doorbell
) -> None:
    ring = Ring(segment.buf, doorbell)
    try:
        read_pos = ring.read_pos
        assert ring.try_append(KIND_EVENT, 1, 1, time.monotonic_ns(), b"x")
        done = threading.Event()

        def worker() -> None:
            ring.sleep(read_pos)  # the last look sees the record: no wait at all
            done.set()

        threading.Thread(target=worker, daemon=True).start()
        assert done.wait(5), "the consumer slept with a record published"
    finally:
        ring.release()


def test_a_consumer_killed_in_its_sleep_does_not_leave_its_successor_unwakeable(
    segment: Segment, doorbell: Doorbell
) -> None:
    """A worker SIGKILLed asleep leaves the sleep sequence odd; the restarted worker's
    sleep must still read as asleep to the producer, or nothing would ring it."""
    producer = Ring(segment.buf, doorbell)
    successor = Ring(segment.buf, doorbell)
    try:
        producer.words[_SLEEP_SEQ] = 5  # odd: its sleeper died without waking
        woke = start_sleeper(successor)
        deadline = time.monotonic() + 5
        while producer.words[_SLEEP_SEQ] == 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert producer.asleep
        assert producer.try_append(KIND_EVENT, 1, 1, time.monotonic_ns(), b"x")
        assert producer.wake_if_sleeping(), "the producer did not see the successor asleep"
        assert woke.wait(5)
        assert not producer.asleep
    finally:
        producer.release()
        successor.release()


def test_a_ring_ahead_of_the_append_never_strands_the_record(
    segment: Segment, doorbell: Doorbell
) -> None:
    """The producer rings before it appends (Fanout.wake_ahead), then appends and
    wakes as usual. A consumer woken ahead that finds nothing and sleeps again at
    once (the worst case: the worker spins a while first) must be rung again by the
    usual wake: the early ring's bookkeeping must not swallow it."""
    producer = Ring(segment.buf, doorbell)
    consumer = Ring(segment.buf, doorbell)
    records = 300
    seen: list[int] = []
    woken_empty = 0
    failed: list[BaseException] = []

    def worker() -> None:
        nonlocal woken_empty
        try:
            rpos = consumer.read_pos
            total = 0
            while len(seen) < records:
                wpos = consumer.write_pos
                if wpos == rpos:
                    consumer.sleep(rpos)
                    if consumer.write_pos == rpos:
                        woken_empty += 1  # woken ahead of the record: sleep again
                    continue
                for pos, nxt, _kind, eid, _fanout, _ts, _length in consumer.records(rpos, wpos):
                    seen.append(eid)
                    rpos = nxt
                    total += 1
                    assert pos < nxt
                consumer.set_read_pos(rpos, total)
        except BaseException as exc:  # reported by the test thread
            failed.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        for k in range(records):
            deadline = time.monotonic() + 5
            while not producer.asleep and time.monotonic() < deadline:
                time.sleep(0)  # until the consumer sleeps on what it has
            producer.wake_if_sleeping()  # ahead: nothing appended yet
            if k % 2:
                time.sleep(0.0002)  # let the consumer wake, find nothing, sleep again
            assert producer.try_append(KIND_EVENT, k, 1, time.monotonic_ns(), b"x")
            with _FENCE:
                pass
            producer.wake_if_sleeping()  # the usual wake, after the append
            deadline = time.monotonic() + 5
            while len(seen) <= k and time.monotonic() < deadline and not failed:
                time.sleep(0.0005)
            assert not failed, failed
            assert len(seen) == k + 1, f"record {k} was stranded: its wake-up was lost"
        assert seen == list(range(records))
        assert woken_empty > 0  # the race was really run: woken ahead, slept again
    finally:
        thread.join(5)
        producer.release()
        consumer.release()
