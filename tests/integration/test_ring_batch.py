"""The batched raise path (Engine.raise_encoded_batch, Relay.forward_batch) with real
rings and worker processes: nothing lost, duplicated or reordered, the accounting
identities kept, control records never overtaken, a full ring waited for."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.options import RING_MIN
from engine.producer import Engine
from engine.sources.relay import Relay
from engine.wire import encode_notification
from tests.helpers.support import Receiver, running_engine, settle, udp_receiver, unix_receiver


def note(event: str, seq: int, pad: int = 0) -> bytes:
    return encode_notification(event, {"seq": seq, "pad": "x" * pad})


def seqs(datagrams: list[bytes]) -> list[tuple[str, int]]:
    out = []
    for d in datagrams:
        msg = json.loads(d)
        out.append((msg["method"], msg["params"]["seq"]))
    return out


@contextmanager
def receivers(n: int) -> Iterator[list[Receiver]]:
    rxs = [udp_receiver() for _ in range(n)]
    try:
        yield rxs
    finally:
        for rx in rxs:
            rx.close()


@contextmanager
def stopped(engine: Engine, worker: int = 0) -> Iterator[None]:
    """The worker process frozen (SIGSTOP) while the block runs."""
    pid = engine.supervisor.pid_of(worker)
    assert pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_mixed_runs_reach_every_subscriber_once_in_order() -> None:
    rng = random.Random(11)
    with receivers(3) as (ra, rb, rab), running_engine(["E_A", "E_B"], workers=2) as engine:
        engine.subscribe("E_A", ra.socket_text)
        engine.subscribe("E_B", rb.socket_text)
        engine.subscribe("E_A", rab.socket_text)
        engine.subscribe("E_B", rab.socket_text)
        ids = {name: engine.event_id(name) for name in ("E_A", "E_B")}
        raised: list[tuple[str, int]] = []
        for _ in range(60):
            eids, payloads = [], []
            for _ in range(rng.randint(1, 64)):
                name = "E_A" if rng.random() < 0.6 else "E_B"
                seq = len(raised)
                raised.append((name, seq))
                eids.append(ids[name])
                payloads.append(note(name, seq, rng.randint(0, 300)))
            assert engine.raise_encoded_batch(eids, payloads) == 0
        want_a = [r for r in raised if r[0] == "E_A"]
        want_b = [r for r in raised if r[0] == "E_B"]
        assert seqs(ra.quiet(expect=len(want_a))) == want_a
        assert seqs(rb.quiet(expect=len(want_b))) == want_b
        assert seqs(rab.quiet(expect=len(raised))) == raised
        settle(engine)
        stats = engine.statistics()
        stats.check_identity()
        assert stats.raised == stats.events_queued == len(raised)
        assert stats.pairs_sent == 2 * len(raised)


def test_forward_batch_counts_every_outcome_and_keeps_the_order() -> None:
    with receivers(1) as (rx,), running_engine(["E_TEST"]) as engine:
        engine.subscribe("E_TEST", rx.socket_text)
        relay = Relay(engine, "test", "batch", unknown_events="register")
        strict = Relay(engine, "test", "strict")
        batch = [
            note("E_TEST", 0),
            b"not json",
            note("E_TEST", 1),
            b'{"jsonrpc":"2.0","method":"E_TEST","params":"a string"}',
            note("E_NEW", 100),  # registered where it stands, then raised
            note("E_TEST", 2),
            b'{"jsonrpc":"2.0","method":"E_TEST","id":1}',
            b'{"jsonrpc":"2.0","method":"bad name"}',
            note("E_TEST", 3),
        ]
        with relay.lock:
            relay.forward_batch(batch)
        with strict.lock:
            strict.forward_batch([note("E_OTHER", 0), note("E_TEST", 4)])
        assert seqs(rx.quiet(expect=5)) == [("E_TEST", k) for k in range(5)]
        s = relay.statistics()
        assert (s.received, s.raised) == (9, 5)
        assert s.rejected["malformed"] == 4 and s.identity_errors() == []
        t = strict.statistics()
        assert (t.received, t.raised, t.rejected["unknown_event"]) == (2, 1, 1)
        settle(engine)
        stats = engine.statistics()
        stats.check_identity()
        assert stats.events_raised["E_NEW"] == 1 and stats.drops["no_subscribers"] == 1
        engine.stop()
        with relay.lock:
            relay.forward_batch([note("E_TEST", 5), b"{}", note("E_TEST", 6)])
        s = relay.statistics()
        assert s.rejected["engine_stopped"] == 2 and s.identity_errors() == []


def raise_sized(engine: Engine, eid: int, seq: int, size: int) -> None:
    """Raise E_TEST `seq` as one record of exactly `size` ring bytes (a batch of one)."""
    base = len(note("E_TEST", seq)) + 24
    assert size >= base and size % 8 == 0
    payload = note("E_TEST", seq, size - base)
    assert len(payload) == size - 24
    assert engine.raise_encoded_batch([eid], [payload]) == 0


def fill_leaving(engine: Engine, eid: int, seq: int, leave: int) -> int:
    """With the worker frozen: fill its ring with events (from `seq` on) until exactly
    `leave` bytes are free, all of them before the read position. Returns the next seq."""
    ring = engine.supervisor.rings[0]
    cap = ring.capacity
    assert ring.published == ring.read_pos and ring.read_pos % cap > leave + 4096
    while (tail := cap - ring.published % cap) > 2048 + 256:  # up to the end of the ring
        raise_sized(engine, eid, seq, 2048)
        seq += 1
    raise_sized(engine, eid, seq, tail)
    seq += 1
    assert ring.published % cap == 0
    while (free := cap - (ring.published - ring.read_pos)) > leave + 2048 + 256:
        raise_sized(engine, eid, seq, 2048)
        seq += 1
    raise_sized(engine, eid, seq, free - leave)
    assert cap - (ring.published - ring.read_pos) == leave
    return seq + 1


def test_a_batch_never_overtakes_a_pending_control_record(tmp_path: Path) -> None:
    # The new subscriber's control record (a long UNIX path: ~240 bytes) does not fit
    # in the 160 bytes left; the small events after it (96 bytes each) would. They
    # must be dropped for the worker all the same, until the record is written.
    with (
        receivers(1) as (old,),
        running_engine(["E_TEST"], workers=1, ring_bytes=RING_MIN, heartbeat_timeout_s=0) as engine,
    ):
        new = unix_receiver(tmp_path, "n" * (100 - len(str(tmp_path))))
        try:
            engine.subscribe("E_TEST", old.socket_text)
            eid = engine.event_id("E_TEST")
            # Move the read position to mid-ring: the free room is then both sides
            # of the end of the data area.
            early = list(range(64))
            engine.raise_encoded_batch([eid] * 64, [note("E_TEST", k, 2000) for k in early])
            assert seqs(old.quiet(expect=64)) == [("E_TEST", k) for k in early]
            settle(engine)
            with stopped(engine):
                seq = fill_leaving(engine, eid, 64, 160)
                filled = list(range(64, seq))
                engine.subscribe("E_TEST", new.socket_text)
                stats = engine.statistics()
                queued, dropped = stats.events_queued, stats.drops["ring_full"]
                late = list(range(seq, seq + 4))
                engine.raise_encoded_batch([eid] * 4, [note("E_TEST", k) for k in late])
                stats = engine.statistics()
                assert stats.events_queued == queued  # none overtook the control record
                assert stats.drops["ring_full"] == dropped + 4
                assert stats.workers[0].ring.used_bytes == RING_MIN - 160  # and none fit
            settle(engine)
            engine.tick()  # the control record, written now that there is room
            final = list(range(seq + 4, seq + 12))
            engine.raise_encoded_batch([eid] * 8, [note("E_TEST", k) for k in final])
            want = [("E_TEST", k) for k in early + filled + final]
            assert seqs(old.quiet(expect=len(want))) == want
            assert seqs(new.quiet(expect=8)) == [("E_TEST", k) for k in final]
            settle(engine)
            engine.statistics().check_identity()
        finally:
            new.close()


def test_the_backlog_bound_applies_to_each_event_of_a_batch() -> None:
    with (
        receivers(1) as (rx,),
        running_engine(
            ["E_TEST"], workers=1, max_pending_datagrams=50, heartbeat_timeout_s=0
        ) as engine,
    ):
        engine.subscribe("E_TEST", rx.socket_text)
        settle(engine)
        eid = engine.event_id("E_TEST")
        with stopped(engine):
            engine.raise_encoded_batch([eid] * 64, [note("E_TEST", k) for k in range(64)])
            stats = engine.statistics()
            assert stats.events_queued == 50 and stats.drops["ring_full"] == 14
        assert [s for _, s in seqs(rx.quiet(expect=50))] == list(range(50))
        settle(engine)
        engine.statistics().check_identity()


def test_a_batch_larger_than_the_ring_waits_for_the_worker() -> None:
    # 64 records of ~8 KiB are twice the ring: with the "wait" policy the batch must
    # publish what it staged and wake the worker before waiting, or it drops.
    with (
        receivers(1) as (rx,),
        running_engine(
            ["E_TEST"],
            workers=1,
            ring_bytes=RING_MIN,
            full_ring_policy="wait",
            full_ring_wait_ms=2000,
        ) as engine,
    ):
        engine.subscribe("E_TEST", rx.socket_text)
        settle(engine)
        eid = engine.event_id("E_TEST")
        n = 0
        for _ in range(3):
            engine.raise_encoded_batch([eid] * 64, [note("E_TEST", n + k, 8000) for k in range(64)])
            n += 64
        assert [s for _, s in seqs(rx.quiet(expect=n))] == list(range(n))
        settle(engine)
        stats = engine.statistics()
        stats.check_identity()
        assert stats.drops["ring_full"] == 0 and stats.events_queued == n
