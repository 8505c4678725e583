"""Bounded delay (SPEC section 10): stale events dropped and counted, a backlog
bounded in datagrams, workers that sleep until woken and never miss a wake-up."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time

import pytest

from engine.errors import WireError
from tests.helpers.support import eventually, running_engine, settle, udp_receiver


def test_events_older_than_max_delay_are_dropped_as_stale_and_counted_exactly() -> None:
    rx = udp_receiver()
    try:
        # heartbeat 0: the stopped worker must not be restarted while we hold it
        with running_engine(max_delay_ms=300, heartbeat_timeout_s=0) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            engine.raise_event("E_TEST", {"seq": "before"})
            assert len(rx.wait_for(1)) == 1
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                for seq in range(100):
                    engine.raise_event("E_TEST", {"seq": seq})
                time.sleep(0.6)  # every one of them is now older than 300 ms
            finally:
                os.kill(pid, signal.SIGCONT)
            settle(engine)
            engine.raise_event("E_TEST", {"seq": "after"})
            got = [json.loads(d)["params"]["seq"] for d in rx.quiet(expect=2)]
            assert got == ["before", "after"]  # nothing late was sent
            stats = engine.statistics()
            stats.check_identity()
            assert stats.pairs_stale == 100
            assert stats.stale_by_event() == {"E_TEST": 100}
            assert stats.pairs_sent == 2
            assert stats.workers[0].pairs_queued == 102
    finally:
        rx.close()


def test_a_backlog_is_bounded_in_datagrams_with_1000_subscribers() -> None:
    sinks = []
    for _ in range(1000):  # bound, never read: the kernel drops what does not fit
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        sinks.append(sink)
    try:
        with running_engine(max_pending_datagrams=20_000, heartbeat_timeout_s=0) as engine:
            for sink in sinks:
                engine.subscribe("E_TEST", f"udp:127.0.0.1:{sink.getsockname()[1]}")
            settle(engine)
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # nothing is consumed while we raise
            try:
                results = [engine.raise_event("E_TEST", {"seq": seq}) for seq in range(100)]
            finally:
                os.kill(pid, signal.SIGCONT)
            # 20,000 datagrams = 20 events of 1,000: the rest count as ring_full,
            # although the ring's bytes would have held them all.
            assert sum(r.queued for r in results) == 20
            assert [r.queued for r in results[:20]] == [True] * 20
            stats = engine.statistics()
            assert stats.drops["ring_full"] == 80
            assert stats.workers[0].pairs_queued == 20_000
            assert stats.workers[0].pairs_dropped == 80_000
            settle(engine, timeout=30)
            engine.raise_event("E_TEST", {"seq": "drained"})  # room again
            settle(engine, timeout=30)
            stats = engine.statistics()
            stats.check_identity()
            assert stats.workers[0].pairs_queued == 21_000
            assert stats.pairs_sent + stats.pairs_failed == 21_000
    finally:
        for sink in sinks:
            sink.close()


def test_no_wake_up_is_lost_when_a_raise_races_the_worker_going_to_sleep() -> None:
    # idle_poll_ms 0: the worker goes to sleep right after its spins, so raises
    # land before, during and after its announcement, thousands of times. A lost
    # wake-up would leave a datagram waiting for the supervisor's nudge (two ticks).
    # Each raise also rings the sleeping worker ahead of its append (wake_ahead).
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.5)
    rounds = 4000
    rng = random.Random(12)
    try:
        with running_engine(idle_poll_ms=0) as engine:
            engine.subscribe("E_TEST", f"udp:127.0.0.1:{rx.getsockname()[1]}")
            worst = 0.0
            for seq in range(rounds):
                pause_until = time.perf_counter() + rng.uniform(0, 300e-6)
                while time.perf_counter() < pause_until:  # a precise pause, no sleep
                    pass
                start = time.perf_counter()
                engine.raise_event("E_TEST", {"seq": seq})
                try:
                    data = rx.recv(1000)
                except TimeoutError:
                    raise AssertionError(f"event {seq} was not delivered: a lost wake-up") from None
                worst = max(worst, time.perf_counter() - start)
                assert json.loads(data)["params"]["seq"] == seq
            stats = engine.statistics()
            stats.check_identity()
            assert stats.pairs_sent == rounds
            # The race was really run: the worker fell asleep over and over.
            assert stats.workers[0].sleeps >= rounds // 4, stats.workers[0].sleeps
            print(f"{rounds} rounds, {stats.workers[0].sleeps} sleeps, worst {worst * 1e3:.2f} ms")
    finally:
        rx.close()


def test_a_worker_killed_while_asleep_is_restarted_and_delivers() -> None:
    rx = udp_receiver()
    try:
        with running_engine(idle_poll_ms=0) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            eventually(lambda: engine.statistics().workers[0].sleeps >= 1, what="a sleep")
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            eventually(
                lambda: engine.supervisor.restarts[0] == 1 and engine.supervisor.ready(0),
                what="the restart",
            )
            engine.raise_event("E_TEST", {"seq": 1})
            assert len(rx.wait_for(1)) == 1
            engine.statistics().check_identity()
    finally:
        rx.close()


def test_a_worker_rung_ahead_of_an_event_that_never_comes_sleeps_again() -> None:
    """raise_event rings a sleeping worker before it encodes (Fanout.wake_ahead); when
    the encoding then fails, the worker woke for nothing: it must spin a moment, go
    back to sleep and still be woken by the next event, with nothing sent meanwhile."""
    rx = udp_receiver()
    try:
        with running_engine(idle_poll_ms=0) as engine:
            engine.subscribe("E_TEST", rx.socket_text)
            engine.raise_event("E_TEST", {"seq": 0})
            assert len(rx.wait_for(1)) == 1
            ring = engine.supervisor.rings[0]
            for _ in range(3):
                eventually(lambda: ring.asleep, what="the worker asleep")
                sleeps = ring.sleeps
                with pytest.raises(WireError):
                    engine.raise_event("E_TEST", {"bad": object()})  # not JSON
                # It woke (rung ahead of an append that never came) and slept again.
                eventually(
                    lambda s=sleeps: ring.sleeps == s + 1 and ring.asleep, what="a new sleep"
                )
                assert engine.supervisor.nudges[0] == 0  # no wake-up was lost
            assert len(rx.quiet(expect=1)) == 1  # nothing was sent for the refused events
            engine.raise_event("E_TEST", {"seq": 1})
            got = [json.loads(d)["params"]["seq"] for d in rx.wait_for(2)]
            assert got == [0, 1]
            stats = engine.statistics()
            stats.check_identity()
            assert stats.pairs_sent == 2
    finally:
        rx.close()
