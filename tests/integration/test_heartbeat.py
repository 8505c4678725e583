"""The supervisor reads the workers' heartbeat: a worker stuck with records waiting
is killed and restarted on its ring; an idle one is left alone, however long."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.helpers.support import eventually, running_engine, udp_receiver

TIMEOUT_S = 1.0


def test_a_stopped_worker_with_records_waiting_is_killed_and_restarted() -> None:
    rx = udp_receiver()
    try:
        with running_engine(["E_TEST"], heartbeat_timeout_s=TIMEOUT_S) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            engine.raise_event("E_TEST", {"seq": -1})
            assert len(rx.wait_for(1)) == 1
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # hung: alive, but never beats again
            stopped_at = time.monotonic()
            for seq in range(300):
                engine.raise_event("E_TEST", {"seq": seq})
            eventually(
                lambda: engine.supervisor.restarts[0] == 1 and engine.supervisor.ready(0),
                timeout=15,
                what="the stuck worker to be replaced",
            )
            took = time.monotonic() - stopped_at
            assert took >= TIMEOUT_S  # not before its heart stood still that long
            assert engine.supervisor.stuck_kills == [1]
            new_pid = engine.statistics().workers[0].pid
            assert new_pid not in (None, pid)
            got = rx.quiet(expect=301)
            seqs = sorted({json.loads(d)["params"]["seq"] for d in got})
            assert seqs == list(range(-1, 300))  # every queued event, resent from the ring
            stats = engine.statistics()
            stats.check_identity()
            assert stats.workers[0].restarts == 1
    finally:
        rx.close()


def test_a_stopped_idle_worker_is_left_alone() -> None:
    with running_engine(["E_TEST"], heartbeat_timeout_s=TIMEOUT_S) as engine:
        pid = engine.statistics().workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # silent, but with nothing to send
        try:
            time.sleep(3 * TIMEOUT_S)
            assert engine.supervisor.stuck_kills == [0]
            assert engine.statistics().workers[0].pid == pid
        finally:
            os.kill(pid, signal.SIGCONT)


def test_a_busy_worker_with_many_subscribers_is_not_mistaken_for_a_stuck_one() -> None:
    # 300 subscribers and long batches (up to the worker's 32,768 datagrams each,
    # ~0.1-0.3 s here) under a 0.5 s timeout: the worker beats per subscriber and
    # per batch, so a busy worker is never taken for a stuck one.
    receivers = [udp_receiver() for _ in range(300)]
    try:
        with running_engine(["E_TEST"], heartbeat_timeout_s=0.5, batch_max=1024) as engine:
            for rx in receivers:
                engine.subscribe("E_TEST", rx.socket_text)
            for seq in range(2048):
                engine.raise_event("E_TEST", {"seq": seq})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if engine.statistics().workers[0].ring.used_bytes == 0:
                    break
                time.sleep(0.05)
            stats = engine.statistics()
            stats.check_identity()
            assert engine.supervisor.stuck_kills == [0]
            assert stats.workers[0].restarts == 0
    finally:
        for rx in receivers:
            rx.close()
