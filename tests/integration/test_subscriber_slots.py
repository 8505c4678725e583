"""Per-subscriber counter slots are given again after a subscriber leaves (issue 19
item 7), with real workers: 20,000 subscribers churned through one worker (more than
its SUBSCRIBER_SLOTS), and every subscriber's counts, in statistics and on /metrics,
are its own from first to last: nothing inherited from a slot's earlier owner,
nothing missed."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import exposition
from engine.producer import Engine
from engine.shm.counters import SUBSCRIBER_SLOTS
from tests.helpers.support import eventually, running_engine, settle, udp_receiver

CHURNED = 20_000
BATCH = 1_000
EVENTS_PER_ROUND = 3
EXPIRING_ROUNDS = (9, 19)  # these rounds leave by expiry, the others by unsubscribe


def subscriber_metrics(engine: Engine) -> dict[str, tuple[float, float]]:
    """(datagrams sent, send failures) per subscriber socket, from /metrics."""
    body, _ = exposition(engine, per_subscriber=True)
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.endswith("subscriber_datagrams_sent_total"):
                out.setdefault(sample.labels["socket"], [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("subscriber_send_failures_total"):
                out.setdefault(sample.labels["socket"], [0.0, 0.0])[1] = sample.value
    return {socket: (sent, failed) for socket, (sent, failed) in out.items()}


def test_20000_subscribers_churned_on_one_worker_each_count_their_own(tmp_path: Path) -> None:
    assert CHURNED > SUBSCRIBER_SLOTS  # past the slots: only reuse gives the late ones one
    keep = udp_receiver()  # subscribed throughout
    kept = 0
    try:
        with running_engine(["E_A"], workers=1, pin=False) as engine:
            engine.subscribe("E_A", keep.socket_text)
            for r in range(CHURNED // BATCH):
                live = udp_receiver()  # one real receiver per batch, the others unreachable
                try:
                    expire = 1 if r in EXPIRING_ROUNDS else 3600
                    gone = [f"unix:{tmp_path}/r{r}-{i}.sock" for i in range(BATCH - 1)]
                    for socket_text in [*gone, live.socket_text]:
                        engine.subscribe("E_A", socket_text, expire)
                    for n in range(EVENTS_PER_ROUND):
                        engine.raise_event("E_A", {"round": r, "n": n})
                    kept += EVENTS_PER_ROUND
                    assert len(live.wait_for(EVENTS_PER_ROUND)) == EVENTS_PER_ROUND
                    assert len(keep.wait_for(kept)) == kept
                    settle(engine)
                    counts = engine.subscriber_counts()
                    assert counts[live.socket_text] == (EVENTS_PER_ROUND, 0), r
                    assert counts[keep.socket_text] == (kept, 0), r
                    unreachable = {counts.get(s) for s in gone}  # a failed send each
                    assert unreachable == {(0, EVENTS_PER_ROUND)}, (r, unreachable)
                    if r in EXPIRING_ROUNDS:
                        eventually(
                            lambda: len(engine.registry.subscribers("E_A")) == 1,
                            timeout=15,
                            what="the round's subscribers expired",
                        )
                    else:
                        for socket_text in [*gone, live.socket_text]:
                            engine.unsubscribe("E_A", socket_text)
                finally:
                    live.close()
            settle(engine)
            assert set(engine.subscriber_counts()) == {keep.socket_text}

            # A new subscriber, after 20,000 left: its counts are its own.
            fresh = udp_receiver()
            try:
                engine.subscribe("E_A", fresh.socket_text)
                for n in range(5):
                    engine.raise_event("E_A", {"after": n})
                kept += 5
                assert len(fresh.wait_for(5)) == 5
                assert len(keep.wait_for(kept)) == kept
                settle(engine)
                assert engine.subscriber_counts() == {
                    keep.socket_text: (kept, 0),
                    fresh.socket_text: (5, 0),
                }
                assert subscriber_metrics(engine) == {
                    keep.socket_text: (kept, 0),
                    fresh.socket_text: (5, 0),
                }
            finally:
                fresh.close()
            stats = engine.statistics()
            stats.check_identity()
            assert stats.workers[0].pairs_sent == kept + 5 + (CHURNED // BATCH) * EVENTS_PER_ROUND
    finally:
        keep.close()


def test_past_the_slots_a_subscriber_has_no_series_rather_than_a_false_zero(
    tmp_path: Path,
) -> None:
    """SUBSCRIBER_SLOTS subscribers on one worker at once: the next one gets no slot
    and keeps none while it stays (even when one frees up), so /metrics shows no
    per-subscriber series for it, never a 0 while it receives; a newcomer takes the
    freed slot, zeroed."""
    held = [f"unix:{tmp_path}/{i}.sock" for i in range(SUBSCRIBER_SLOTS)]
    late, newcomer = udp_receiver(), udp_receiver()
    try:
        # Unreachable subscribers share one socket (socket_limit): no descriptor each.
        with running_engine(["E_A", "E_B"], workers=1, pin=False, socket_limit=1) as engine:
            for socket_text in held:
                engine.subscribe("E_A", socket_text)
            engine.subscribe("E_B", late.socket_text)
            engine.raise_event("E_A", {"to": "the held ones"})
            engine.raise_event("E_B", {"to": "late"})
            assert len(late.wait_for(1)) == 1
            settle(engine)
            counts = engine.subscriber_counts()
            assert late.socket_text not in counts and len(counts) == SUBSCRIBER_SLOTS
            assert {counts[s] for s in held} == {(0, 1)}
            assert late.socket_text not in subscriber_metrics(engine)
            engine.unsubscribe("E_A", held[0])  # frees a slot (with a failure counted)
            settle(engine)
            engine.subscribe("E_B", newcomer.socket_text)
            engine.raise_event("E_B", {"to": "late and newcomer"})
            assert len(late.wait_for(2)) == 2 and len(newcomer.wait_for(1)) == 1
            settle(engine)
            metrics = subscriber_metrics(engine)
            assert late.socket_text not in metrics
            assert metrics[newcomer.socket_text] == (1, 0)
            engine.statistics().check_identity()
    finally:
        late.close()
        newcomer.close()


def test_a_slot_waits_for_its_worker_to_read_past_the_removal_even_across_a_restart(
    tmp_path: Path,
) -> None:
    """Subscribers leave while their worker is frozen with an event for them still
    queued: their slots must not go to the newcomers subscribed meanwhile (that event,
    sent later, would land in a newcomer's count). The worker is then killed and
    restarted (it resumes from its ring), and later newcomers get the freed slots,
    zeroed."""
    keep = udp_receiver()
    first = [f"unix:{tmp_path}/first-{i}.sock" for i in range(100)]
    second = [f"unix:{tmp_path}/second-{i}.sock" for i in range(100)]
    third = [f"unix:{tmp_path}/third-{i}.sock" for i in range(100)]
    try:
        with running_engine(["E_A"], workers=1, pin=False) as engine:
            engine.subscribe("E_A", keep.socket_text)
            for socket_text in first:
                engine.subscribe("E_A", socket_text)
            engine.raise_event("E_A", {"n": 1})
            keep.wait_for(1)
            settle(engine)
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            engine.raise_event("E_A", {"n": 2})  # queued for `first`, not yet sent
            for socket_text in first:
                engine.unsubscribe("E_A", socket_text)
            for socket_text in second:
                engine.subscribe("E_A", socket_text)
            engine.raise_event("E_A", {"n": 3})  # for `second`
            with contextlib.suppress(ProcessLookupError):  # or the heartbeat check did
                os.kill(pid, signal.SIGKILL)
            eventually(lambda: engine.supervisor.ready(0), what="the restart")
            assert len(keep.wait_for(3)) == 3
            settle(engine)
            counts = engine.subscriber_counts()
            assert {counts[s] for s in second} == {(0, 1)}
            assert counts[keep.socket_text] == (3, 0)
            for socket_text in third:  # the freed slots now (their worker read past)
                engine.subscribe("E_A", socket_text)
            engine.raise_event("E_A", {"n": 4})
            assert len(keep.wait_for(4)) == 4
            settle(engine)
            counts = engine.subscriber_counts()
            assert {counts[s] for s in third} == {(0, 1)}
            assert {counts[s] for s in second} == {(0, 2)}
            assert set(counts) == {keep.socket_text, *second, *third}
            stats = engine.statistics()
            stats.check_identity()
            assert stats.workers[0].restarts == 1
    finally:
        keep.close()
